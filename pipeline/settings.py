"""The options of every command, as typed frozen dataclasses (docs/architecture.md §2).

One module, importing neither torch nor transformers, so that `pipeline --help` and a refused option
cost a Python start-up, not a model library's. Each field's help is the CLI help, YAML keys and
flags share names, ``pipeline.config.load_config`` checks types, choices and bounds; options every
model-loading command takes are one group (``RuntimeOptions``) composed into the stage configs.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import opt
from pipeline.demo_vlm import ALIAS as DEMO_VLM
from pipeline.tasks.base import SPLITS
from pipeline.tasks.builtin_text import DEFAULT_TEXT_TASK
from pipeline.tasks.sampling import DEMO_CHOICES

LAYER_TARGETS = ("mlp", "layer", "attn")
"""Which state stage 1 caches and stage 2 aligns: the MLP output (before the residual add, as the
official code), the decoder layer output, or the self-attention output."""
ALIGN_LOSSES = ("mse", "l2sum", "kl", "none")
"""mse: mean squared error over layers x tokens x dims per sample, then over the batch (the official
code's reduction). l2sum: squared L2 distance summed over layers and dims, averaged over tokens (the
paper's per-token L2). kl: KL(teacher || student) on the answer tokens' next-token distributions
from the stored top-k teacher log-probs (the paper's MimIC-dagger ablation; LIVE's loss). none: CE only."""
VARIANTS = ("mimic", "head_shared", "query_independent", "shift_only")
"""mimic: per-head f and v (the paper's method). head_shared: one f (w, b) shared by all heads of a
layer (mu still uses each head's own log Z2). query_independent: mu = sigmoid(g) with a learned
scalar g per head. shift_only: mu = 1 (a plain per-head shift)."""
MODES = ("zero-shot", "icl", "student")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
"""Autocast of stage 2's forwards through ``accelerate``: none, float16 (a GPU; loss scaling) or bfloat16."""
TRACKERS = ("none", "tensorboard", "wandb")
COMPILE_CHOICES = ("auto", "on", "off")  # pipeline.decoding
"""Experiment trackers stage 2 reports to through ``accelerate`` (besides its own train_log.jsonl)."""
DEFAULT_DEMO_TASK = "shapes_group_vqa"


@dataclass(frozen=True)
class RuntimeOptions:
    """Where and how a command loads its model (shared by every command that loads one)."""

    device: str = opt("auto", "cpu, cuda, cuda:N, or auto (the accelerate rank's device).")
    dtype: str = opt("auto", "auto (bf16 on CUDA, fp32 on CPU), bfloat16, float32.")
    revision: str | None = opt(None, "Model revision (hub branch, tag or commit).")
    trust_remote_code: bool = opt(False, "Allow the model repository's own code to run.")


@dataclass(frozen=True)
class TeacherCacheConfig(RuntimeOptions):
    """Options of `pipeline teacher-cache` (YAML keys and CLI flags have the same names)."""

    task: str = opt("vqav2", "Task name (vqav2, okvqa, coco_caption, shapes_vqa, a built-in text task) or a task YAML path.")
    model: str = opt("idefics2-8b", "Model alias (configs/models), hub id or local directory.")
    out: str | None = opt(None, "Store path; default cache/<task>.zarr.")
    shots: int | None = opt(None, "Demonstrations per query; default from configs/models (Idefics1 32, Idefics2 8).", at_least=0)
    n_queries: int = opt(1000, "Training queries to cache (first N of the task's train split).", at_least=1)
    seed: int = opt(3407, "Seed of the demonstration sampler.", at_least=0)
    demos: str = opt("random", "Demonstrations: random (seeded draw) or similar (the k support examples nearest to "
                               "the query by the model's own image or text embeddings, RICES; cached in "
                               "<cache>/retrieval/).", DEMO_CHOICES)
    layer_target: str = opt("mlp", "Which state is aligned: mlp output, decoder layer output, attention output.", LAYER_TARGETS)
    batch_size: int = opt(0, "Teacher forwards per batch; 0 = auto (start high, halve on out-of-memory).", at_least=0)
    topk: int = opt(20, "Also store the teacher's top-k answer log-probs per token (LIVE and --align kl train on them; "
                        "~0.5% of the store); 0 = off; at most the vocabulary size.", at_least=0)
    shard_size: int | None = opt(None, "Samples per shard file; default by size (16 large, 64 small); fixed when the store is created.", at_least=1)
    max_length: int | None = opt(None, "Longest teacher prompt allowed; default the model's context length (more is refused).", at_least=1)
    data_root: str | None = opt(None, "Root of the official data files (or env MIMIC_DATA).")
    num_workers: int | None = opt(None, "Processes preparing prompts and images while the GPU works; "
                                       "default 4 on CUDA, 0 (in the main process) on CPU.", at_least=0)
    writers: int | None = opt(None, "Threads compressing and writing shards while the GPU works; default 1 (one "
                                    "compresses ~360 MiB/s; more help once the GPU outruns it).", at_least=1)
    overwrite: bool = opt(False, "Replace an existing store made with a different configuration.")


@dataclass(frozen=True)
class TrainConfig(RuntimeOptions):
    """Options of `pipeline train-student` (YAML keys and CLI flags have the same names)."""

    cache: str | None = opt(None, "Teacher store written by `pipeline teacher-cache` (required unless --online with --task).")
    method: str = opt("mimic", "Student method: mimic, live (one vector per layer), lora (PEFT), hificl (low-rank "
                               "virtual keys and values per head), mimic-lora (both, an lr each), the training-free "
                               "tv (Task Vector) and fv (Function Vector), fitted from the store with the layer "
                               "chosen on held-out training queries, or a plug-in installed through the "
                               "entry-point group mimic_pipeline.methods.")
    variant: str = opt("mimic", "MimIC variant: mimic, head_shared, query_independent, shift_only.", VARIANTS)
    align: str | None = opt(None, "Alignment loss: mse (official), l2sum (paper), kl (top-k logits), none. Default by method.", (*ALIGN_LOSSES, None))
    lambda_gt: float = opt(0.5, "Weight of the cross-entropy term L_gt.", at_least=0)
    ce_tokens: str = opt("answer", "Cross-entropy on the answer tokens, or on all tokens (official code).", ("answer", "all"))
    epochs: int | None = opt(None, "Epochs; default the model's (pipeline/configs/models: Idefics2 5, Idefics1 10), "
                                    "raised on small data to reach --min-steps.", at_least=1)
    min_steps: int = opt(300, "Without --epochs: train at least this many optimiser steps (more epochs on small "
                              "data: 40 queries get 30 epochs, 1000 keep the model's); 0 = the model's epochs.",
                         at_least=0)
    max_steps: int | None = opt(None, "Stop after this many optimiser steps (smoke tests, benchmarks).", at_least=1)
    lr: float | None = opt(None, "AdamW learning rate; default by method: 5e-3 for mimic and live (the official "
                                 "code), 1e-3 for lora (5e-3 diverged on SmolLM2, see docs/results.md).", above=0)
    lora_lr: float = opt(1e-3, "AdamW learning rate of the LoRA part of --method mimic-lora (LoRA's default); "
                               "--lr sets its MimIC part.", above=0)
    weight_decay: float = opt(1e-3, "AdamW weight decay (none on biases).", at_least=0)
    warmup_ratio: float = opt(0.1, "Fraction of steps of linear warm-up before the cosine decay.", at_least=0, at_most=1)
    grad_clip: float = opt(1.0, "Gradient norm clip.", above=0)
    batch_size: int = opt(2, "Samples per micro-batch per device.", at_least=1)
    grad_accum: int = opt(2, "Micro-batches per optimiser step.", at_least=1)
    mixed_precision: str = opt("no", "Autocast the forwards (accelerate): no, fp16 (a GPU; with loss scaling) or bf16 "
                                     "(GPU or CPU). Part of the run's settings: a resume must use the same.",
                               MIXED_PRECISIONS)
    report_to: str = opt("none", "Also log loss, align, gt, lr, grad_norm and samples_per_s per step to an experiment "
                                 "tracker (accelerate): tensorboard (event files in runs/<name>/tensorboard/) or "
                                 "wandb (project mimic-pipeline). May change on resume.", TRACKERS)
    seed: int = opt(3407, "Seed of initialisation and data order.", at_least=0)
    name: str | None = opt(None, "Run name (runs/<name>); default <store>-<method>[-<variant>].")
    runs_dir: str = opt("runs", "Where runs are written.")
    checkpoint_every: int = opt(50, "Optimiser steps between checkpoints (resume after a kill).", at_least=1)
    online: bool = opt(False, "Run the teacher every step instead of reading the store.")
    resample_demos: bool = opt(True, "--online: draw new demonstrations each epoch (as the official code).")
    demos: str | None = opt(None, "--online: random or similar demonstrations; default the store's choice (another "
                                  "is refused), else random.", (*DEMO_CHOICES, None))
    task: str | None = opt(None, "--online without a store: the task.")
    model: str | None = opt(None, "Model; default the store's model.")
    shots: int | None = opt(None, "--online without a store: demonstrations per query (required there).", at_least=1)
    n_queries: int | None = opt(None, "Training queries: the first N of the store (default all of them; the "
                                      "data-efficiency curve of one store), or with --online and no store the "
                                      "first N of the train split (default 1000).", at_least=1)
    layer_target: str = opt("mlp", "--online without a store: the aligned state.", LAYER_TARGETS)
    data_root: str | None = opt(None, "Root of the official data files (or env MIMIC_DATA).")
    num_workers: int | None = opt(None, "DataLoader worker processes reading the store, building the student "
                                       "prompts and collating each micro-batch while the GPU trains; default 4 on "
                                       "CUDA, 0 (in the main process) on CPU.", at_least=0)
    compile: str = opt("off", "Run the student's training forward through torch.compile: on, off, or auto = on "
                               "CUDA from 2500 steps on. On an H200 (Idefics2-8B shape) a MimIC step's forward+"
                               "backward takes 97 ms instead of 181, after ~2 min of compiling: a gain only for long "
                               "runs. Loss and gradients equal the eager ones within float tolerance. May change on "
                               "resume.", COMPILE_CHOICES)
    force: bool = opt(False, "Train even if the model does not match the store's fingerprint.")
    overwrite: bool = opt(False, "Start over even if the run directory holds a checkpoint of another config.")


@dataclass(frozen=True)
class EvalConfig(RuntimeOptions):
    """Options of `pipeline evaluate` (YAML keys and CLI flags have the same names)."""

    runs: tuple[str, ...] = opt((), "Student run directories (or run names under --runs-dir); default: the most recent run (newest adapter file).")
    runs_dir: str = opt("runs", "Where run names are looked up and the most recent run is found.")
    task: str | None = opt(None, "Task name or task YAML path; default the run's task (from its teacher store).")
    model: str | None = opt(None, "Model alias, hub id or directory; default the run's base model.")
    shots: int | None = opt(None, "Demonstrations of the ICL mode; default the run's store's shots, else configs/models.")
    modes: tuple[str, ...] = opt(MODES, "Which of zero-shot, icl, student to evaluate.")
    n_queries: int = opt(200, "Queries: the first N of the split (built-in splits are seeded samples); 0 = the whole split. The paper reports whole validation splits.")
    split: str = opt("eval", "Split the queries come from.", SPLITS)
    batch_size: int = opt(8, "Prompts per generate call (left-padded).")
    num_beams: int = opt(3, "Beams of the beam search (3 as the paper's harness).")
    seed: int = opt(3407, "Seed of the demonstration sampler (the same sampler as teacher-cache).")
    demos: str = opt("random", "Demonstrations of the icl mode: random (seeded) or similar (nearest by the model's "
                               "own embeddings; its result is icl-<k>shot-similar).", DEMO_CHOICES)
    results_dir: str = opt("results", "Where results/<task>/ is written (results of other settings are kept beside earlier ones).")
    l2: bool = opt(True, "Per-layer L2 distance of zero-shot and student states to the k-shot teacher's, on held-out "
                         "queries (when the run's store exists: its shots, seed and layer target).")
    l2_queries: int = opt(32, "Held-out queries of the L2 analysis (the first N of the evaluated split; the teacher "
                              "runs on them as teacher-cache ran it for the run's store).")
    data_root: str | None = opt(None, "Root of the official data files (or env MIMIC_DATA); default the store's.")
    metrics: tuple[str, ...] = opt((), "Metrics besides the task's: chair (object hallucination of COCO captions: "
                                       "CHAIRs, CHAIRi, recall; annotations from --coco-annotations).")
    coco_annotations: str | None = opt(None, "Folder of the COCO annotations CHAIR reads: every instances_*.json and "
                                             "captions_*.json in it; default <data root>/coco/annotations.")
    report_to: str = opt("none", "Also log each mode's score, ms/query and mean L2 to an experiment tracker "
                                 "(accelerate): tensorboard (event files in <results-dir>/<task>/tensorboard/) or "
                                 "wandb (project mimic-pipeline).", TRACKERS)
    compile: str = opt("auto", "Decode through a compiled forward over a static KV cache (CUDA graphs): on, off, or "
                               "auto = on CUDA from 1000 queries per mode on. Same answers within float tolerance; "
                               "2.3x faster decoding at batch 1 on an H200, after about a minute of compiling per "
                               "mode.", COMPILE_CHOICES)


@dataclass(frozen=True)
class DemoConfig:
    """Options of `pipeline demo`."""

    model: str = opt(DEMO_VLM, "Model alias, hub id or directory (default: the demo VLM, SmolLM2-135M + a small "
                               "vision tower; smollm2-135m for the text-only model).")
    task: str = opt(DEFAULT_DEMO_TASK, "Task: shapes_group_vqa, shapes_vqa, a built-in text task (e.g. "
                                       f"{DEFAULT_TEXT_TASK}, for a text-only model) or a task YAML.")
    shots: int = opt(8, "Demonstrations of the teacher and of the ICL baseline.", at_least=1)
    n_queries: int = opt(200, "Training queries cached by the teacher.", at_least=1)
    epochs: int = opt(3, "Training epochs of the student.", at_least=1)
    eval_queries: int = opt(100, "Held-out queries evaluated per mode.", at_least=1)
    batch_size: int = opt(8, "Batch size of the teacher forwards and of generation.", at_least=1)
    cache_dir: str = opt("cache", "Where the teacher store is written.")
    runs_dir: str = opt("runs", "Where the student run is written.")
    results_dir: str = opt("results", "Where results and the table are written.")
    device: str = opt("auto", "cpu, cuda, cuda:N, or auto.")
    threads: int = opt(2, "CPU threads of torch. On a 2-core machine 2 halves the demo VLM's time (8-shot "
                          "prompts of ~200 tokens); 1 was faster for the text task's ~40-token prompts.", at_least=1)


@dataclass(frozen=True)
class InspectConfig:
    """Options of `pipeline inspect STORE|RUN` (read-only: it never writes into a store or a run)."""

    target: str = opt("", "A teacher store (cache/<task>.zarr) or a run directory (runs/<name>).")
    verify: bool = opt(False, "Store: read every chunk of every array and check its checksum (dask, in parallel, "
                              "bounded memory, progress bar on stderr); damage is a one-line error naming the "
                              "arrays, shards and samples (exit 2).")
    json: bool = opt(False, "Print the report as one JSON object on stdout (for scripts) instead of text.")
    norms: bool = opt(True, "Store: compute the per-layer mean norm of the cached states (reads every hs chunk "
                            "once; --no-norms for a quick look at a large store).")
    png: str | None = opt(None, "Store: where to write the per-layer mean-norm plot; default "
                                "<store without .zarr>.layer_norms.png beside the store (never inside it).")
    results_dir: str = opt(EvalConfig.results_dir, "Run: where `pipeline evaluate` wrote results/<task>/*.json; the "
                                      "evaluations of the run are looked up there.")
    workers: int | None = opt(None, "Threads reading chunks for --verify and the norms; default min(8, CPUs).",
                              at_least=1)
