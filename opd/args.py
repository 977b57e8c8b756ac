"""Settings of the `opd` commands other than `train` (whose config is `opd.config.DistillConfig`): one frozen dataclass
per command, one docstring per field.

They live here, apart from the code that runs them, so that building the command line (`opd --help`) imports no
torch, transformers or fastapi; `opd.quickstart`, `opd.lm.eval`, `opd.lm.serve.app`, `opd.lm.recipes.supervised` and
`opd.lm.hf.lora` re-export the ones they run.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields
from typing import Annotated, Literal

import tyro

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]
"""What `opd serve` reports as a generated token's log-prob (see `ServeArgs.logprobs_mode`)."""


@dataclass(frozen=True)
class QuickstartArgs:
    """The quickstart comparison; the defaults are what the README's numbers come from."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """One run of each method per seed (prompt order, sampling), all from the same warm-started student."""
    steps: int = 200
    """Student updates for each method."""
    batch_size: int = 32
    """Prompts per update."""
    lr: float = 1e-3
    """Student learning rate (both methods)."""
    warm_start_steps: int = 1500
    """Most SFT steps (batch 64) on ground truth for the student's starting point; the warm start stops earlier, as soon
    as the student gets 20 % of training problems right (this student learns the task suddenly, at a step that varies
    by seed). Cached after the first run."""
    warm_start_seed: int = 0
    """Seed of the warm start (initialisation and data)."""
    eval_examples: int = 500
    """Held-out problems for the accuracies in the table."""
    out_dir: str = "runs/quickstart"
    """Run directory: teacher/, seed-*/ runs, results.json."""
    threads: int = 2
    """torch CPU threads."""


@dataclass(frozen=True)
class TeacherArgs:
    """Train a teacher on a task's ground-truth worked examples, measure its held-out accuracy, save it."""

    task: str = "arithmetic"
    """Task name (see `opd.tasks.TASKS`)."""
    size: str = "teacher"
    """Model size (a key of `opd.tasks.models.MODEL_SIZES`)."""
    steps: int = 1500
    """Optimizer steps; each sees fresh problems (steps * batch_size distinct draws)."""
    batch_size: int = 64
    """Examples per step."""
    lr: float = 3e-3
    """Peak learning rate (AdamW, 5% warmup, cosine decay to 0)."""
    seed: int = 0
    """Seed for the initialisation, the training problems and their order."""
    eval_examples: int = 1000
    """Held-out ("test" split) problems used to measure greedy accuracy."""
    threads: int = 2
    """torch CPU threads."""
    out_dir: str | None = None
    """Where to save; default `$OPD_CACHE/<task>-teacher` (`$OPD_CACHE` defaults to `~/.cache/opd`)."""

    def command(self) -> str:
        """The `opd teacher ...` command line that reproduces these settings (output directory left out)."""
        flags = []
        for f in fields(self):
            if f.name != "out_dir":
                flags += [f"--{f.name.replace('_', '-')}", str(getattr(self, f.name))]
        return shlex.join(["opd", "teacher", *flags])


@dataclass(frozen=True)
class EvalArgs:
    """Evaluate a model on held-out prompts: a task's test split or your own data (and against a teacher, if given)."""

    model: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="MODEL")]
    """The model to evaluate: hub id or local directory (e.g. runs/opd/checkpoint, a LoRA checkpoint too, or the run
    directory runs/opd itself: its latest checkpoint)."""
    teacher: str | None = None
    """If set, also report the mean per-token reverse KL KL(model ‖ teacher) on the model's own samples."""
    task: str = "arithmetic"
    """Task whose held-out ("test") split is used when --data is not given."""
    data: str | None = None
    """Your held-out prompts instead: a .jsonl/.json/.parquet/.csv file, a saved dataset or a hub name
    (`opd.lm.data.prompts`)."""
    data_split: str = "test"
    """Split of --data to read."""
    data_fields: str = ""
    """Map your column names to opd's, e.g. prompt=question,answer=final."""
    checker: str | None = None
    """exact | contains | numeric | regex:PATTERN | ifeval | task:NAME | module:function; default: the task's
    checker."""
    examples: int = 500
    """Number of held-out prompts (the first this many rows of --data)."""
    max_new_tokens: int = 64
    """Longest completion (with --tools: longest turn)."""
    tools: str | None = None
    """Hold conversations with a tool, as `distill --tools` does: calc or module:function. The checker then scores
    the whole conversation after the prompt. Default: the task's own tool (arithmetic-tools: calc), else none."""
    max_turns: int = 8
    """With --tools: the most turns of one conversation."""
    seed: int = 0
    """Seed of the sampling for the KL estimate (accuracy is greedy)."""
    out_json: str | None = None
    """Also write the numbers to this JSON file."""
    samples: str | None = None
    """Also write every prompt, its completion and its score to this JSONL file."""
    show: int = 3
    """Print this many prompts with their completions and scores (0: none)."""
    threads: int | None = None
    """torch CPU threads; default: one per core that no other job is running on."""


@dataclass(frozen=True)
class ServeArgs:
    """Settings of `opd serve`."""

    model_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="MODEL_DIR")]
    """Directory of a Hugging Face causal LM (config, weights, tokenizer), as written by `save_pretrained`."""
    served_model_name: str | None = None
    """Name clients put in `model`; defaults to `model_dir`, like vLLM."""
    host: str = "127.0.0.1"
    """Address to listen on; 127.0.0.1 keeps the server private to this machine."""
    port: int = 8000
    """Port to listen on."""
    api_key: str | None = None
    """If set, requests to /v1 and /opd must carry `Authorization: Bearer <api_key>`. Default: the environment
    variable OPD_API_KEY (which, unlike a flag, `ps` does not show)."""
    weights_root: str | None = None
    """Directory under which `POST /opd/update_weights` may load weights (for `opd train --sampler`, its
    OUT_DIR/sampler_weights or a parent). Unset: the server refuses weight pushes."""
    allowed_hosts: tuple[str, ...] = ()
    """Names accepted in the Host header besides localhost, IP addresses, --host and, with --host 0.0.0.0, this
    machine's name (a guard against DNS rebinding from a browser); `*` accepts any."""
    device: str | None = None
    """Torch device for the model; default cuda when available, else cpu."""
    dtype: str = "auto"
    """Weights dtype (`auto` keeps the checkpoint's, or float32, bfloat16, float16)."""
    max_batch_size: int = 32
    """Most sequences in one forward; larger batches are split."""
    batch_window_ms: float = 5.0
    """How long the batcher waits for more requests after the first one arrives before running the batch."""
    max_tokens: int = 1024
    """Most tokens one request may generate per sequence."""
    max_model_len: int | None = None
    """Context length (prompt + generation); defaults to the config's `max_position_embeddings`."""
    max_prompt_len: int | None = None
    """Most prompt tokens; defaults to the context length."""
    max_logprobs: int = 20
    """Largest `logprobs` / `prompt_logprobs` top-k accepted (vLLM's default is 20 too)."""
    max_seqs_per_request: int = 256
    """Most sequences (prompts x n) in one request."""
    max_request_bytes: int = 16 * 2**20
    """Largest request body accepted (413 above it)."""
    max_header_bytes: int = 64 * 2**10
    """Largest request head (request line and headers) accepted; above it the connection is closed."""
    max_queued_seqs: int = 1024
    """Most sequences waiting for the model; a request that would pass it gets 503 with Retry-After (opd's clients
    retry with back-off), so a flood is refused at once rather than answered minutes late."""
    max_connections: int = 256
    """Most open connections; more get 503 (uvicorn's --limit-concurrency)."""
    read_timeout: float = 30.0
    """Seconds a client has to send a whole request (head and body), counted from the connection's opening or the
    request's first byte; a connection still short of it is closed (a client dribbling bytes would otherwise hold it
    for ever)."""
    max_response_bytes: int = 512 * 2**20
    """Largest hidden-state or LM-head answer built (400 above it: ask for fewer sequences or head rows); opd's
    hidden-state teacher asks for at most 64 MB at a time."""
    logprobs_mode: LogprobsMode = "raw_logprobs"
    """Log-probs reported for generated tokens: `raw_logprobs` (the model's, temperature 1, vLLM's default) or
    `processed_logprobs` (the distribution actually sampled from: after logit bias, penalties, temperature, min_p,
    top-k and top-p; vLLM's `--logprobs-mode processed_logprobs`). Raw log-probs ignore all of these."""
    threads: int | None = None
    """torch CPU threads; default: one per core that no other job is running on when the server starts."""

    def __post_init__(self) -> None:
        limits = ("max_batch_size", "max_tokens", "max_seqs_per_request", "max_request_bytes",
                  "max_header_bytes", "max_queued_seqs", "max_connections", "max_response_bytes", "read_timeout")
        for name in limits:
            if getattr(self, name) <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, not {getattr(self, name):g}")


@dataclass(frozen=True)
class MergeArgs:
    """Fold a LoRA run's adapter into its base model and write a plain Hugging Face model directory."""

    run_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="RUN_DIR")]
    """The run's directory (with config.json and checkpoint/), or a checkpoint directory holding an adapter."""
    out_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="OUT_DIR")]
    """Where the merged model and its tokenizer go; must not exist yet (or be empty)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Data type of the written weights (float32, bfloat16, float16); the merge itself is done in float32."""


@dataclass(frozen=True)
class StudentArgs:
    """Make a student from a teacher: a subset of its decoder layers, with its embeddings, head and tokenizer
    (DistilBERT's initialisation). Any Hugging Face causal LM whose decoder holds its layers in one list."""

    teacher: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="TEACHER")]
    """The teacher: a hub id or local directory (dir::file.gguf for a GGUF file)."""
    out_dir: Annotated[tyro.conf.Positional[str], tyro.conf.arg(metavar="OUT_DIR")]
    """Where the student and its tokenizer go; must not exist yet (or be empty)."""
    layers: int | None = None
    """Keep this many layers, evenly spaced, the first and the last included."""
    keep: str | None = None
    """Which layers instead of --layers: every-other (0, 2, 4, ...), or indices such as 0,1,2,29 (0-based)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Data type of the written weights."""

    def __post_init__(self) -> None:
        if (self.layers is None) == (self.keep is None):
            raise ValueError("pass one of --layers N (evenly spaced) or --keep every-other | I,J,... (which layers)")
        if self.layers is not None and self.layers < 1:
            raise ValueError("--layers must be >= 1")


@dataclass(frozen=True)
class InterpretArgs:
    """Print the interpretable policies saved in a directory: the tree as if/else rules, the linear policy and the
    formula as equations."""

    policy: Annotated[str, tyro.conf.arg(metavar="DIR")]
    """Directory holding interpretable.json (written by `opd.control.interpretable.save_interpretable` or by
    `opd bench robotics`: benchmarks/results/robotics_interpretable/TASK)."""


@dataclass(frozen=True)
class PlotArgs:
    """Plot the curves of one or more training runs (their metrics.jsonl) into one image."""

    runs: Annotated[tyro.conf.Positional[tuple[str, ...]], tyro.conf.arg(metavar="RUN")]
    """Run directories (each holding the metrics.jsonl that `opd train` writes); each run is one line, labelled with
    its directory's name."""
    out: str
    """Image file to write (.png, .pdf, .svg: the suffix picks the format)."""
