"""Regenerate the built-in text tasks' JSONL files: ``python pipeline/configs/tasks/words/build.py``.

Deterministic (no randomness but one seeded sample); every line is ``{"id", "input", "answer"}``.
Pairs are curated to have one canonical answer (ambiguous items such as "right" or "old" as inputs,
or verbs with two past forms such as "learn", are left out) since the metric is exact match.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent

ANTONYMS = """
hot:cold, big:small, up:down, fast:slow, happy:sad, light:dark, tall:short, rich:poor, early:late,
open:closed, full:empty, hard:soft, strong:weak, young:old, wet:dry, thick:thin, loud:quiet,
clean:dirty, heavy:light, cheap:expensive, good:bad, true:false, win:lose, push:pull, above:below,
inside:outside, day:night, black:white, left:right, north:south, east:west, front:back, first:last,
alive:dead, friend:enemy, love:hate, buy:sell, give:take, question:answer, male:female, before:after,
always:never, come:go, enter:exit, high:low, wide:narrow, deep:shallow, sharp:dull, smooth:rough,
sweet:sour, safe:dangerous, easy:difficult, accept:reject, add:subtract, arrive:depart,
asleep:awake, absent:present, ancient:modern, appear:disappear, agree:disagree, increase:decrease,
maximum:minimum, major:minor, majority:minority, inner:outer, upper:lower, import:export,
include:exclude, inhale:exhale, internal:external, visible:invisible, possible:impossible,
legal:illegal, polite:rude, patient:impatient, known:unknown, lock:unlock, pack:unpack, tie:untie,
fold:unfold, load:unload, like:dislike, honest:dishonest, obey:disobey, connect:disconnect,
cover:uncover, able:unable, fair:unfair, kind:cruel, brave:cowardly, war:peace, victory:defeat,
success:failure, profit:loss, sunrise:sunset, summer:winter, heaven:hell, boy:girl, king:queen,
husband:wife, brother:sister, son:daughter, uncle:aunt, father:mother, man:woman, nephew:niece,
prince:princess, lord:lady, actor:actress, groom:bride, he:she, yes:no, on:off, in:out, over:under,
top:bottom, plus:minus, positive:negative, odd:even, multiply:divide, teacher:student,
employer:employee, host:guest, parent:child, buyer:seller, winner:loser, predator:prey,
speaker:listener, beautiful:ugly, new:old, long:short, ahead:behind, backward:forward, better:worse,
best:worst, careful:careless, clever:stupid, complete:incomplete, correct:incorrect, cool:warm,
crooked:straight, dawn:dusk, dim:bright, fat:thin, fancy:plain, many:few, floor:ceiling,
foolish:wise, forget:remember, lost:found, frequent:rare, fresh:stale, guilty:innocent,
healthy:sick, hello:goodbye, here:there, horizontal:vertical, humble:proud, inferior:superior,
joy:sorrow, junior:senior, lead:follow, least:most, less:more, loose:tight, melt:freeze, messy:neat,
midnight:noon, morning:evening, natural:artificial, near:far, noisy:quiet, optimist:pessimist,
past:future, permanent:temporary, plural:singular, private:public, problem:solution, quick:slow,
raise:lower, rare:common, raw:cooked, real:fake, rise:fall, same:different, save:spend,
shout:whisper, show:hide, simple:complex, sink:float, sit:stand, sober:drunk, solid:liquid,
tame:wild, together:apart, tragedy:comedy, transparent:opaque, upstairs:downstairs, urban:rural,
useful:useless, vacant:occupied, valuable:worthless, vowel:consonant, wealth:poverty, wrong:right,
yesterday:tomorrow, all:none, allow:forbid, amateur:professional, ancestor:descendant,
approve:disapprove, arrival:departure, ascend:descend, attach:detach, attract:repel,
fertile:barren, beginner:expert, birth:death, borrow:lend, boring:interesting, build:destroy,
capable:incapable, cause:effect, certain:uncertain, comfortable:uncomfortable, compliment:insult,
conceal:reveal, convex:concave, credit:debit, cry:laugh, demand:supply, dense:sparse,
dependent:independent, domestic:foreign, encourage:discourage, entrance:exit, equal:unequal,
exterior:interior, find:lose, fortunate:unfortunate, frown:smile, gather:scatter,
harmful:harmless, help:hinder, hero:villain, hire:fire, hit:miss, hollow:solid, indoor:outdoor,
input:output, just:unjust, knowledge:ignorance, land:sea, leader:follower, lengthen:shorten,
limited:unlimited, live:die, logical:illogical, loyal:disloyal, marry:divorce,
masculine:feminine, mature:immature, mental:physical, mortal:immortal, nothing:everything,
offense:defense, order:disorder, pass:fail, punish:reward, qualified:unqualified,
regular:irregular, rigid:flexible, seldom:often, send:receive, shrink:grow, silence:noise,
static:dynamic, strength:weakness, teach:learn, throw:catch, sun:moon, angel:devil,
everybody:nobody, giant:dwarf, believe:doubt, bless:curse, advance:retreat, active:passive,
accurate:inaccurate
"""

PAST_TENSE = """
walk:walked, talk:talked, jump:jumped, play:played, cook:cooked, clean:cleaned, open:opened,
close:closed, watch:watched, listen:listened, call:called, help:helped, ask:asked, answer:answered,
work:worked, live:lived, love:loved, like:liked, want:wanted, need:needed, start:started,
finish:finished, stop:stopped, plan:planned, try:tried, cry:cried, carry:carried, study:studied,
hurry:hurried, worry:worried, marry:married, copy:copied, reply:replied, dance:danced,
smile:smiled, laugh:laughed, move:moved, wait:waited, visit:visited, climb:climbed,
paint:painted, push:pushed, pull:pulled, kick:kicked, kiss:kissed, miss:missed, pass:passed,
wash:washed, brush:brushed, fix:fixed, mix:mixed, fill:filled, kill:killed, turn:turned,
return:returned, rain:rained, look:looked, bake:baked, hate:hated, change:changed,
arrive:arrived, decide:decided, believe:believed, hope:hoped, use:used, agree:agreed,
enjoy:enjoyed, stay:stayed, pray:prayed, obey:obeyed, destroy:destroyed, annoy:annoyed,
drop:dropped, shop:shopped, hug:hugged, beg:begged, rob:robbed, grab:grabbed, nod:nodded,
chat:chatted, clap:clapped, drag:dragged, admit:admitted, prefer:preferred, regret:regretted,
occur:occurred, order:ordered, offer:offered, enter:entered, happen:happened,
remember:remembered, consider:considered, discover:discovered, deliver:delivered,
explain:explained, complain:complained, remain:remained, attack:attacked, borrow:borrowed,
follow:followed, allow:allowed, join:joined, point:pointed, count:counted, print:printed,
end:ended, add:added, land:landed, plant:planted, rest:rested, test:tested, trust:trusted,
wish:wished, guess:guessed, press:pressed, dress:dressed, touch:touched, reach:reached,
search:searched, match:matched, stretch:stretched, relax:relaxed, own:owned, show:showed,
jog:jogged, skip:skipped, ship:shipped, wrap:wrapped, slip:slipped, step:stepped, rub:rubbed,
apply:applied, deny:denied, fry:fried, dry:dried, bury:buried, empty:emptied, supply:supplied,
notice:noticed, produce:produced, prepare:prepared, compare:compared, share:shared,
ignore:ignored, explore:explored, invite:invited, create:created, translate:translated,
celebrate:celebrated, complete:completed, vote:voted, taste:tasted, waste:wasted, chase:chased,
raise:raised, cause:caused, refuse:refused, go:went, eat:ate, see:saw, take:took, give:gave,
come:came, run:ran, swim:swam, sing:sang, drink:drank, ring:rang, begin:began, sit:sat, get:got,
forget:forgot, write:wrote, ride:rode, drive:drove, rise:rose, speak:spoke, break:broke,
choose:chose, freeze:froze, steal:stole, wake:woke, wear:wore, tear:tore, know:knew, grow:grew,
throw:threw, blow:blew, fly:flew, draw:drew, fall:fell, hold:held, tell:told, sell:sold,
buy:bought, bring:brought, think:thought, fight:fought, seek:sought, catch:caught, teach:taught,
find:found, make:made, have:had, do:did, say:said, pay:paid, lay:laid, leave:left, feel:felt,
keep:kept, sleep:slept, sweep:swept, weep:wept, meet:met, feed:fed, lead:led, bleed:bled,
hear:heard, lose:lost, shoot:shot, send:sent, spend:spent, lend:lent, bend:bent, build:built,
mean:meant, stand:stood, understand:understood, win:won, dig:dug, stick:stuck, swing:swung,
strike:struck, bite:bit, hide:hid, slide:slid, become:became, forgive:forgave, shake:shook,
sink:sank, shrink:shrank, flee:fled, deal:dealt
"""

PLURALS = """
cat:cats, dog:dogs, book:books, car:cars, tree:trees, house:houses, bird:birds, apple:apples,
chair:chairs, table:tables, pen:pens, pencil:pencils, cup:cups, bottle:bottles, door:doors,
window:windows, girl:girls, friend:friends, river:rivers, mountain:mountains, flower:flowers,
garden:gardens, street:streets, city:cities, country:countries, baby:babies, lady:ladies,
party:parties, story:stories, family:families, berry:berries, cherry:cherries, puppy:puppies,
body:bodies, army:armies, key:keys, boy:boys, toy:toys, day:days, monkey:monkeys,
valley:valleys, box:boxes, fox:foxes, bus:buses, class:classes, glass:glasses, dress:dresses,
kiss:kisses, church:churches, watch:watches, match:matches, beach:beaches, bench:benches,
brush:brushes, dish:dishes, wish:wishes, bush:bushes, tax:taxes, wolf:wolves, knife:knives,
leaf:leaves, life:lives, wife:wives, half:halves, shelf:shelves, loaf:loaves, thief:thieves,
calf:calves, potato:potatoes, tomato:tomatoes, hero:heroes, echo:echoes, piano:pianos,
photo:photos, radio:radios, zoo:zoos, man:men, woman:women, child:children, tooth:teeth,
foot:feet, goose:geese, mouse:mice, person:people, ox:oxen, sheep:sheep, deer:deer,
series:series, species:species, crisis:crises, analysis:analyses, thesis:theses,
phenomenon:phenomena, criterion:criteria, lamp:lamps, shoe:shoes, hat:hats, coat:coats,
shirt:shirts, sock:socks, ring:rings, bell:bells, ball:balls, game:games, name:names,
place:places, face:faces, hand:hands, eye:eyes, ear:ears, nose:noses, arm:arms, leg:legs,
head:heads, heart:hearts, idea:ideas, word:words, letter:letters, number:numbers,
picture:pictures, song:songs, movie:movies, plate:plates, spoon:spoons, fork:forks, bowl:bowls,
horse:horses, cow:cows, pig:pigs, duck:ducks, frog:frogs, snake:snakes, lion:lions, tiger:tigers,
bear:bears, rabbit:rabbits, ant:ants, bee:bees, fly:flies, spider:spiders, egg:eggs,
banana:bananas, orange:oranges, lemon:lemons, carrot:carrots, onion:onions, cake:cakes,
cookie:cookies, candy:candies, sandwich:sandwiches, peach:peaches, kitchen:kitchens, room:rooms,
wall:walls, roof:roofs, chief:chiefs, cliff:cliffs, belief:beliefs, desk:desks, lesson:lessons,
school:schools, teacher:teachers, doctor:doctors, nurse:nurses, farmer:farmers, king:kings,
queen:queens, prince:princes, princess:princesses, boss:bosses, witness:witnesses,
address:addresses, business:businesses, village:villages, island:islands, ocean:oceans,
lake:lakes, forest:forests, hill:hills, road:roads, bridge:bridges, train:trains, plane:planes,
boat:boats, ship:ships, truck:trucks, bike:bikes, wheel:wheels, clock:clocks, phone:phones,
computer:computers, camera:cameras, map:maps, coin:coins, bag:bags, box:boxes, gift:gifts,
penny:pennies, lily:lilies, fairy:fairies, enemy:enemies, city:cities, day:days, journey:journeys,
turkey:turkeys, donkey:donkeys, tray:trays, ray:rays, guy:guys, virus:viruses,
genius:geniuses, circus:circuses, hero:heroes, volcano:volcanoes, kangaroo:kangaroos,
video:videos, studio:studios, kilo:kilos, memo:memos, igloo:igloos, tattoo:tattoos,
shampoo:shampoos, question:questions, answer:answers, month:months, week:weeks, year:years,
hour:hours, minute:minutes, second:seconds, star:stars, planet:planets, cloud:clouds
"""

_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_in_words(n: int) -> str:
    """American English words for 0 <= n < 1000, e.g. 342 -> 'three hundred forty-two'."""
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])
    rest = n % 100
    return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + number_in_words(rest))


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'a:b, c:d' -> [(a, b), (c, d)]; later duplicates of an input are dropped."""
    seen: dict[str, str] = {}
    for item in text.replace("\n", " ").split(","):
        source, target = (part.strip() for part in item.split(":"))
        seen.setdefault(source, target)
    return list(seen.items())


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def rows(task: str, pairs: list[tuple[str, str]]) -> list[dict[str, str]]:
    return [{"id": f"{task}-{slug(a)}", "input": a, "answer": b} for a, b in pairs]


def build() -> dict[str, list[dict[str, str]]]:
    numbers = sorted(random.Random(0).sample(range(1000), 400))
    return {
        "antonyms": rows("antonyms", parse_pairs(ANTONYMS)),
        "past_tense": rows("past_tense", parse_pairs(PAST_TENSE)),
        "plurals": rows("plurals", parse_pairs(PLURALS)),
        "number_words": rows("number_words", [(number_in_words(n), str(n)) for n in numbers]),
    }


def main() -> None:
    for task, items in build().items():
        ids = [r["id"] for r in items]
        if len(set(ids)) != len(ids):
            raise SystemExit(f"{task}: duplicate ids")
        lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items)
        (HERE / f"{task}.jsonl").write_text(lines)
        print(f"{task}: {len(items)} examples")


if __name__ == "__main__":
    main()
