"""CHAIR object-hallucination metrics for image captions (Rohrbach et al., EMNLP 2018).

Follows the reference implementation ``utils/chair.py`` of github.com/LisaAnne/Hallucination (latest
stored commit a967f2f): its synonym list (``pipeline/data/chair/synonyms.txt``, verbatim, read the
same way: ``line.strip().split(", ")``, first entry = the MSCOCO object), its "double words" (two
tokens read as one word: "hot dog", "teddy bear", "motor cycle", ... and "train track" / "home
plate", which block "train" / nothing), its special cases ("baby"/"adult" + animal -> the animal,
"passenger jet/train" -> the vehicle, "bow tie" -> tie, "toilet seat" -> toilet, and "seat" dropped
when "toilet" is mentioned) and its counting:

* ground-truth objects of an image = the MSCOCO instance categories annotated on it ∪ the objects
  its reference captions mention (each category mapped to its synonym-list line, as the reference);
* CHAIRs = % captions with at least one hallucinated object; CHAIRi = % hallucinated mentions among
  all object mentions (a mention repeated in a caption counts each time);
* recall = mentioned ground-truth objects / ground-truth objects, summed over captions; the reference
  has none, this is the "Recall" that OPERA's chair.py (github.com/shikiw/OPERA, after Maxlinn's
  CHAIR-metric-standalone) adds.

Differences from the reference, all in tokenisation (it uses nltk.word_tokenize and pattern.en's
``singularize``, neither installed here):

* tokens are runs of ``[a-z0-9]`` joined by hyphens in the lower-cased caption ("t-shirt" stays one
  token as with nltk; "dog's" gives "dog" + "s" where nltk gives "dog" + "'s"; neither is an object);
* ``singularize`` is the small rule set below, not pattern.en's. It agrees with pattern.en on the
  plurals of the synonym list (people -> person, children -> child, women -> woman, knives -> knife,
  mice -> mouse, oxen -> ox, skis -> ski, buses -> bus, benches -> bench, puppies -> puppy) but keeps
  words pattern.en mangles: pattern.en strips any final "s", so the reference reads "bus" as "bu" and
  "glass" as "glas" (hence its "wine glas" rule, kept here) and never detects a singular bus; it also
  reads "ties" as "ty", "canoes" as "cano" and "thieves" as "thieve". Here those are bus / tie /
  canoe / thief, so a caption using them can score differently from the reference.
* CHAIRi and recall are 0 (not a ZeroDivisionError) when no object is mentioned / annotated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import UserError

SYNONYMS_PATH = Path(__file__).with_name("data") / "chair" / "synonyms.txt"

# Reference chair.py, CHAIR.__init__, verbatim (duplicates and the unreachable three-word
# "stove top oven" included: pairs of tokens are looked up, so it never fires).
_COCO_DOUBLE_WORDS = (
    "motor bike", "motor cycle", "air plane", "traffic light", "street light", "traffic signal",
    "stop light", "fire hydrant", "stop sign", "parking meter", "suit case", "sports ball", "baseball bat",
    "baseball glove", "tennis racket", "wine glass", "hot dog", "cell phone", "mobile phone", "teddy bear",
    "hair drier", "potted plant", "bow tie", "laptop computer", "stove top oven", "hot dog", "teddy bear",
    "home plate", "train track",
)
# "baby bird" would otherwise fire "person" (baby); "passenger jet" likewise (passenger).
_ANIMAL_WORDS = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe",
                 "animal", "cub")
_VEHICLE_WORDS = ("jet", "train")


def _double_word_dict() -> dict[str, str]:
    """The reference ``double_word_dict``: two-token phrase -> the word it is read as."""
    table = {w: w for w in _COCO_DOUBLE_WORDS}
    for animal in _ANIMAL_WORDS:
        table[f"baby {animal}"] = animal
        table[f"adult {animal}"] = animal
    for vehicle in _VEHICLE_WORDS:
        table[f"passenger {vehicle}"] = vehicle
    table["bow tie"] = "tie"
    table["toilet seat"] = "toilet"
    table["wine glas"] = "wine glass"  # pattern.en's "glass" -> "glas"; harmless here
    return table


# --- singularisation: a small documented rule set standing in for pattern.en's singularize -------------
_UNINFLECTED = frozenset({
    "as", "is", "us", "has", "was", "his", "this", "yes", "gas", "plus", "thus", "always", "perhaps",
    "tennis", "iris", "axis", "chassis", "analysis", "basis", "crisis", "oasis", "lens", "debris",
    "series", "species", "news", "scissors", "pants", "jeans", "shorts", "trousers", "christmas",
    "canvas", "physics", "mathematics", "omen", "semen", "specimen", "abdomen", "stamen", "ramen", "amen",
    "hymen", "regimen", "acumen", "lumen",
})
_IRREGULAR = {
    "feet": "foot", "teeth": "tooth", "geese": "goose", "mice": "mouse", "oxen": "ox",
    "knives": "knife", "wives": "wife", "lives": "life", "leaves": "leaf", "loaves": "loaf",
    "calves": "calf", "halves": "half", "shelves": "shelf", "wolves": "wolf", "scarves": "scarf",
    "thieves": "thief", "hooves": "hoof", "buses": "bus", "busses": "bus", "gases": "gas",
}
# Plural suffixes of compounds: "policemen", "grandchildren", "townspeople".
_IRREGULAR_SUFFIXES = (("people", "person"), ("children", "child"), ("men", "man"))
# Words ending in "ie" whose plural must not become "-y" ("ties" -> "tie", not "ty").
_IE_WORDS = frozenset({
    "tie", "pie", "cookie", "doggie", "collie", "movie", "zombie", "hippie", "rookie", "goalie", "brownie",
    "hoodie", "selfie", "veggie", "birdie", "smoothie", "beanie", "auntie", "bootie", "calorie", "lie",
})
_OE_WORDS = frozenset({"shoe", "toe", "hoe", "canoe", "oboe", "floe", "foe", "doe", "roe"})
_RULES = (  # applied in order, first match wins
    (re.compile(r"([^aeiou])ies$"), r"\1y"),  # puppies -> puppy, lorries -> lorry
    (re.compile(r"(x|ch|sh|ss|zz)es$"), r"\1"),  # boxes, benches, brushes, glasses
    (re.compile(r"([^aeiou])oes$"), r"\1o"),  # potatoes, buffaloes
    (re.compile(r"([^s])s$"), r"\1"),  # dogs, horses, taxis, tvs; not "glass"
)


def singularize(word: str) -> str:
    """Singular of a lower-case English noun, by the rules above (unknown singulars pass unchanged).

    Words of 2 characters or fewer, words ending in "ss" or "us" ("glass", "bus", "octopus") and
    ``_UNINFLECTED`` stay as they are; then ``_IRREGULAR`` words, compound suffixes (-men, -people,
    -children), "-ie"/"-oe" words, and the regular rules in ``_RULES``.
    """
    if len(word) <= 2 or word in _UNINFLECTED or word.endswith(("ss", "us")):
        return word
    if word in _IRREGULAR:
        return _IRREGULAR[word]
    for plural, singular in _IRREGULAR_SUFFIXES:
        if word.endswith(plural):
            return word[: -len(plural)] + singular
    if word.endswith("s") and (word[:-1] in _IE_WORDS or word[:-1] in _OE_WORDS):
        return word[:-1]
    for pattern, replacement in _RULES:
        if pattern.search(word):
            return pattern.sub(replacement, word)
    return word


_TOKEN = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def tokenize(caption: str) -> list[str]:
    """Lower-case, split into word tokens (hyphenated words kept whole), singularise each."""
    return [singularize(tok) for tok in _TOKEN.findall(caption.lower())]


def load_synonyms(path: str | Path = SYNONYMS_PATH) -> list[list[str]]:
    """The synonym lines: ``[object, synonym, ...]`` each, split as the reference (header skipped)."""
    text = Path(path).read_text(encoding="utf-8")
    return [line.strip().split(", ") for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


# --- annotation loading ------------------------------------------------------------------------------
def _norm_id(image_id: Any) -> Any:
    """COCO ids are ints; a caption dict read from JSON has str keys: "391895" -> 391895."""
    if isinstance(image_id, str) and image_id.strip().isdigit():
        return int(image_id)
    return image_id


def _read_one(source: Any, kind: str) -> tuple[str, Mapping]:
    if isinstance(source, Mapping):
        return f"the {kind} dict", source
    if not isinstance(source, (str, Path)):
        raise TypeError(f"Chair: {kind} must be a path, a loaded dict or a list of them, got "
                        f"{type(source).__name__}.")
    path = Path(source)
    if not path.is_file():
        raise UserError(f"CHAIR: {kind} annotation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"CHAIR: {kind} annotation file {path} is not valid JSON: {err.msg} at line "
                        f"{err.lineno} column {err.colno}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"CHAIR: cannot read {kind} annotation file {path}: {err}") from None
    if not isinstance(data, Mapping):
        raise UserError(f"CHAIR: {kind} annotation file {path} holds a JSON {type(data).__name__}, not "
                        f"a COCO object with 'annotations'.")
    return str(path), data


def _read_all(sources: Any, kind: str) -> list[tuple[str, Mapping]]:
    """One source or several (the reference merges train2014 and val2014)."""
    if isinstance(sources, (str, Path, Mapping)):
        sources = [sources]
    loaded = [_read_one(s, kind) for s in sources]
    if not loaded:
        raise UserError(f"CHAIR: no {kind} annotation file given.")
    return loaded


def _records(name: str, data: Mapping, key: str, fields: tuple[str, ...], what: str) -> list[Mapping]:
    """``data[key]`` as a list of dicts holding ``fields``, or a one-line UserError."""
    items = data.get(key)
    if not isinstance(items, list):
        raise UserError(f"CHAIR: {name} has no '{key}' list; expected COCO {what} "
                        f"(e.g. {what}_val2014.json).")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping) or any(f not in item for f in fields):
            raise UserError(f"CHAIR: {name}: {key}[{i}] lacks {' / '.join(fields)}; expected COCO {what}.")
        bad = [f for f in fields
               if f.endswith("id") and (isinstance(item[f], bool) or not isinstance(item[f], (int, str)))]
        if bad:  # ids are looked up by value: a list or object there is no COCO id
            raise UserError(f"CHAIR: {name}: {key}[{i}].{bad[0]} is {item[bad[0]]!r}; expected an integer id "
                            f"(COCO {what}).")
    return items


class Chair:
    """CHAIR evaluator over COCO annotations: ``Chair(instances, captions).compute({image_id: caption})``.

    ``instances`` / ``captions``: paths of ``instances_*.json`` / ``captions_*.json`` (or already
    loaded dicts in that layout), one each or lists (e.g. train2014 + val2014, as the reference).
    Raises a one-line ``UserError`` for a missing, unreadable or malformed file.
    """

    def __init__(self, instances: Any, captions: Any, synonyms_path: str | Path = SYNONYMS_PATH):
        self.synonyms = load_synonyms(synonyms_path)
        self.objects = {word for line in self.synonyms for word in line}
        # Later lines win for a word listed twice, as the reference's dict assignment.
        self.inverse = {word: line[0] for line in self.synonyms for word in line}
        self.double_words = _double_word_dict()
        self._categories: dict[Any, list[str]] = {}  # image id -> annotated category names
        self._references: dict[Any, list[str]] = {}  # image id -> reference captions
        self._images: set[Any] = set()
        self._gt_cache: dict[Any, frozenset[str]] = {}
        for name, data in _read_all(instances, "instances"):
            self._add_instances(name, data)
        for name, data in _read_all(captions, "captions"):
            self._add_captions(name, data)

    def _add_instances(self, name: str, data: Mapping) -> None:
        cats = _records(name, data, "categories", ("id", "name"), "instances")
        id_to_name = {c["id"]: c["name"] for c in cats}
        for c in cats:
            if c["name"] not in self.inverse:
                raise UserError(f"CHAIR: {name}: category {c['name']!r} is not an MSCOCO object of the "
                                f"CHAIR synonym list; CHAIR needs COCO instances annotations.")
        for ann in _records(name, data, "annotations", ("image_id", "category_id"), "instances"):
            if ann["category_id"] not in id_to_name:
                raise UserError(f"CHAIR: {name}: annotation on image {ann['image_id']} has category_id "
                                f"{ann['category_id']} missing from 'categories'.")
            image = _norm_id(ann["image_id"])
            self._categories.setdefault(image, []).append(id_to_name[ann["category_id"]])
            self._images.add(image)
        self._add_images(name, data, "instances")

    def _add_captions(self, name: str, data: Mapping) -> None:
        for ann in _records(name, data, "annotations", ("image_id", "caption"), "captions"):
            if not isinstance(ann["caption"], str):
                raise UserError(f"CHAIR: {name}: caption of image {ann['image_id']} is not a string.")
            image = _norm_id(ann["image_id"])
            self._references.setdefault(image, []).append(ann["caption"])
            self._images.add(image)
        self._add_images(name, data, "captions")

    def _add_images(self, name: str, data: Mapping, what: str) -> None:
        if "images" in data:  # optional: an image with no instance may still be listed here
            self._images.update(_norm_id(im["id"]) for im in _records(name, data, "images", ("id",), what))

    def caption_objects(self, caption: str) -> tuple[list[str], list[str]]:
        """(matched words, their MSCOCO objects), one pair per mention, in caption order: the
        reference ``caption_to_words`` (singularise, merge double words, drop "seat" next to "toilet",
        keep synonym-list words, map each to its line's object)."""
        tokens = tokenize(caption)
        words, i = [], 0
        while i < len(tokens):
            pair = " ".join(tokens[i:i + 2])
            if pair in self.double_words:
                words.append(self.double_words[pair])
                i += 2
            else:
                words.append(tokens[i])
                i += 1
        if "toilet" in words and "seat" in words:
            words = [w for w in words if w != "seat"]
        words = [w for w in words if w in self.objects]
        return words, [self.inverse[w] for w in words]

    def gt_objects(self, image_id: Any) -> frozenset[str]:
        """Annotated categories of the image ∪ objects its reference captions mention."""
        image = _norm_id(image_id)
        if image not in self._gt_cache:
            objects = {self.inverse[name] for name in self._categories.get(image, [])}
            for ref in self._references.get(image, []):
                objects.update(self.caption_objects(ref)[1])
            self._gt_cache[image] = frozenset(objects)
        return self._gt_cache[image]

    def _score_caption(self, image_id: Any, caption: str) -> dict:
        words, mentioned = self.caption_objects(caption)
        gt = self.gt_objects(image_id)
        hallucinated = [obj for obj in mentioned if obj not in gt]
        recalled = {obj for obj in mentioned if obj in gt}
        return {"caption": caption, "words": words, "mentioned": mentioned, "hallucinated": hallucinated,
                "gt_objects": sorted(gt), "recalled": sorted(recalled),
                "chair_s": 100.0 if hallucinated else 0.0,
                "chair_i": 100.0 * len(hallucinated) / len(mentioned) if mentioned else 0.0,
                "recall": 100.0 * len(recalled) / len(gt) if gt else 0.0}

    def compute(self, captions: Mapping[Any, str]) -> dict:
        """Score generated captions ``{image_id: caption}`` (int ids, or their digit strings).

        Returns ``{"CHAIRs", "CHAIRi", "recall"}`` in %, the counts behind them (``n_captions``,
        ``n_hallucinated_captions``, ``n_mentions``, ``n_hallucinated``, ``n_gt_objects``,
        ``n_recalled``) and ``per_caption``: image id -> words, mentioned objects (one per mention),
        hallucinated ones, gt_objects, recalled, and that caption's chair_s / chair_i / recall in %.
        """
        if not isinstance(captions, Mapping) or len(captions) == 0:
            raise ValueError("Chair.compute: pass a non-empty dict {image_id: caption}.")
        unknown = [i for i in captions if _norm_id(i) not in self._images]
        if unknown:
            raise UserError(f"CHAIR: {len(unknown)} captioned image(s) are in no annotation file (first: "
                            f"{unknown[0]!r}); pass the annotations of the split the captions describe.")
        per_caption = {_norm_id(i): self._score_caption(i, c) for i, c in captions.items()}
        rows = per_caption.values()
        n_mentions = sum(len(r["mentioned"]) for r in rows)
        n_hall = sum(len(r["hallucinated"]) for r in rows)
        n_gt = sum(len(r["gt_objects"]) for r in rows)
        n_recalled = sum(len(r["recalled"]) for r in rows)
        n_hall_caps = sum(1 for r in rows if r["hallucinated"])
        return {"CHAIRs": 100.0 * n_hall_caps / len(per_caption),
                "CHAIRi": 100.0 * n_hall / n_mentions if n_mentions else 0.0,
                "recall": 100.0 * n_recalled / n_gt if n_gt else 0.0,
                "n_captions": len(per_caption), "n_hallucinated_captions": n_hall_caps,
                "n_mentions": n_mentions, "n_hallucinated": n_hall, "n_gt_objects": n_gt,
                "n_recalled": n_recalled, "per_caption": per_caption}
