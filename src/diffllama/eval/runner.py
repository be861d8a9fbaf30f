"""``diffllama eval``: run the evaluations on one checkpoint, write JSON and PNG files, print a one-screen summary.

Tasks (:data:`TASKS`; all but ``harness`` by default):

- ``perplexity``: :mod:`~diffllama.eval.perplexity` on text files, or on the held-out split of the bundled corpus.
- ``needle``: multi-needle retrieval, :mod:`~diffllama.eval.needle` (heatmap per (N, R)).
- ``attention``: attention allocation on the needle samples, :mod:`~diffllama.eval.attention_allocation`.
- ``outliers``: activation outliers on windows of the same text, :mod:`~diffllama.eval.outliers`.
- ``quantization``: loss and needle accuracy with fake-quantised attention logits, :mod:`~diffllama.eval.quantization`.
- ``icl``: in-context-learning order robustness, :mod:`~diffllama.eval.icl`.
- ``harness``: lm-evaluation-harness tasks (needs ``pip install diffllama[eval]``), :mod:`~diffllama.eval.harness`.

Files in the output folder: ``results.json`` (every figure plus the settings), ``needle_N{n}_R{r}.png``,
``attention_allocation.png``, ``quantization.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from diffllama.eval import attention_allocation, icl, needle, outliers, perplexity, quantization
from diffllama.eval.attention_maps import check_bits
from diffllama.modeling import DiffLlamaForCausalLM
from diffllama.tokenizer import Tokenizer

TASKS = ("perplexity", "needle", "attention", "outliers", "quantization", "icl", "harness")
DEFAULT_TASKS = TASKS[:-1]
_PACKAGE_DATA = Path(__file__).resolve().parents[1] / "data"  # the labelled Rotten Tomatoes slices ship with the package


@dataclass
class EvalSettings:
    """Settings of :func:`evaluate`; every field is a ``diffllama eval`` flag.

    Attributes:
        tasks: names from :data:`TASKS`. texts: text files for ``perplexity``, ``outliers`` and the quantised
            losses (default: the held-out split of the bundled corpus).
        window, stride: perplexity window and step in tokens (default: the model's maximum, non-overlapping).
        max_tokens: held-out tokens scored by ``perplexity`` (0 = all). lengths: needle context lengths
            (default :func:`~diffllama.eval.needle.default_lengths`). samples: needle samples per cell, length and
            depth. outlier_sequences: held-out windows for ``outliers``. bits: quantisation widths.
        quantization_tokens: held-out tokens for the quantised losses. quantization_lengths: needle lengths
            whose single-needle (N = R = 1) samples are re-scored at each width (default: the longest).
        icl_train, icl_test: labelled CSV/JSONL (default: the Rotten Tomatoes slices of a source checkout).
        icl_k, icl_orders, icl_test_size: demonstrations, orders, test rows. harness_tasks, include_path,
        harness_limit: lm_eval task names, a folder of task YAMLs, and examples per task. seed: sampling seed.
    """

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    texts: list[str] = field(default_factory=list)
    window: int | None = None
    stride: int | None = None
    max_tokens: int = 16384
    lengths: list[int] | None = None
    samples: int = 1
    outlier_sequences: int = 4
    bits: list[int] = field(default_factory=lambda: [8, 6, 4])
    quantization_tokens: int = 4096
    quantization_lengths: list[int] | None = None
    icl_train: str | None = None
    icl_test: str | None = None
    icl_k: int = 4
    icl_orders: int = 5
    icl_test_size: int = 48
    harness_tasks: list[str] = field(default_factory=list)
    include_path: str | None = None
    harness_limit: int | None = None
    seed: int = 0
    batch_size: int = 8

    def check(self) -> None:
        """Raise ValueError naming the field for a bad value (unknown task, counts < 1, ...)."""

        unknown = [t for t in self.tasks if t not in TASKS]
        if unknown or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of {', '.join(TASKS)}; got {self.tasks}")
        for name in ("samples", "outlier_sequences", "quantization_tokens", "icl_k", "icl_orders", "icl_test_size",
                     "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0 (0 = all), got {self.max_tokens}")
        for b in self.bits:
            check_bits(b)
        for path in self.texts:
            if not Path(path).is_file():
                raise ValueError(f"texts: {path} is not a file")
        if "harness" in self.tasks and not self.harness_tasks:
            raise ValueError("the harness task needs harness_tasks (lm_eval task names)")


def _load(model_dir: str, device: str | None, dtype: str | None):
    import torch


    target = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = DiffLlamaForCausalLM.from_pretrained(
        model_dir, device=target, dtype=dtype or ("float32" if target.type == "cpu" else None),
        attn_implementation="sdpa").eval()
    return model, Tokenizer.from_pretrained(model_dir)


def evaluate(model_dir: str, out_dir: str | Path, settings: EvalSettings | None = None, *, device: str | None = None,
             dtype: str | None = None, progress: bool = True, model=None, tokenizer=None) -> dict:
    """Run ``settings.tasks`` on the checkpoint in ``model_dir`` and write ``out_dir/results.json`` and the plots.

    ``model``/``tokenizer`` may be given already loaded (the study script evaluates the model it trained).
    Returns the results dict (also written). Raises: ValueError from :meth:`EvalSettings.check`, before any work,
    or naming ``out_dir`` when it (or a folder above it) is a file.
    """
    import torch


    settings = settings or EvalSettings()
    settings.check()
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as error:  # out_dir, or a folder above it, is a file
        raise ValueError(f"out_dir {str(out_dir)!r} must be a folder: {error}") from error
    if model is None:
        model, tokenizer = _load(model_dir, device, dtype)
    limit = model.config.max_position_embeddings
    window = settings.window or limit
    results: dict = {"model": str(model_dir), "settings": asdict(settings), "timings_s": {}}
    tasks = settings.tasks
    held_out = None

    def timed(name, fn):
        t0 = time.perf_counter()
        with torch.no_grad():
            results[name] = fn()
        results["timings_s"][name] = round(time.perf_counter() - t0, 2)

    def tokens(count):  # the --text files' tokens when given, else the held-out split's (tokenized on first use)
        nonlocal held_out
        if held_out is None:
            held_out = (torch.tensor([t for p in settings.texts for t in tokenizer.encode(
                Path(p).read_text(encoding="utf-8"), add_special_tokens=False)]) if settings.texts
                else perplexity.held_out_tokens(tokenizer)[0])
        return held_out[:count] if count else held_out

    if "perplexity" in tasks:
        if settings.texts:
            texts = [Path(p).read_text(encoding="utf-8") for p in settings.texts]
            timed("perplexity", lambda: perplexity.perplexity_of_texts(model, tokenizer, texts, window,
                                                                          settings.stride, settings.batch_size))
        else:
            timed("perplexity", lambda: {**perplexity.held_out_perplexity(
                model, tokenizer, window, settings.stride, settings.max_tokens or None, settings.batch_size),
                "data": "held-out split of the bundled corpus"})
    samples = []
    if {"needle", "attention", "quantization"} & set(tasks):
        lengths = settings.lengths or needle.default_lengths(limit)
        samples, skipped = needle.build_samples(tokenizer, lengths, settings.samples, seed=settings.seed)
        results["needle_skipped"] = skipped
    if "needle" in tasks:
        def run_needle():
            table = needle.accuracy_table(needle.score_samples(model, tokenizer, samples, progress))
            needle.plot_heatmaps(table, out)
            return table
        timed("needle", run_needle)
    if "attention" in tasks:
        def run_attention():
            result = attention_allocation.attention_allocation(model, samples, progress=progress)
            attention_allocation.plot_allocation(result, out / "attention_allocation.png")
            return result
        timed("attention", run_attention)
    if "outliers" in tasks:
        stream = tokens(window * settings.outlier_sequences).tolist()
        sequences = [stream[i:i + window] for i in range(0, len(stream), window)][:settings.outlier_sequences]
        timed("outliers", lambda: outliers.activation_outliers(model, sequences, progress=progress))
    if "quantization" in tasks:
        keep = settings.quantization_lengths or [max((s.length for s in samples), default=0)]
        subset = [s for s in samples if s.length in keep and s.num_needles == 1]  # decoding without cache: slow

        def run_quantization():
            result = quantization.quantization_robustness(
                model, tokenizer, tokens(settings.quantization_tokens), window, subset, settings.bits,
                batch_size=settings.batch_size, progress=progress)
            _plot_quantization(result, out / "quantization.png")
            return result
        timed("quantization", run_quantization)
    if "icl" in tasks:
        train = settings.icl_train or (_PACKAGE_DATA / "rt_train.csv")
        test = settings.icl_test or (_PACKAGE_DATA / "rt_test.csv")
        if Path(train).is_file() and Path(test).is_file():
            timed("icl", lambda: icl.icl_order_robustness(
                model, tokenizer, train, test, k=settings.icl_k, n_test=settings.icl_test_size,
                orders=settings.icl_orders, seed=settings.seed, batch_size=settings.batch_size,
                progress=progress))
        else:
            results["icl"] = {"skipped": f"no labelled data: give icl_train/icl_test ({train} not found)"}
    if "harness" in tasks:
        from diffllama.eval.harness import run_harness  # lazy: lm_eval is an optional dependency (the eval extra)

        timed("harness", lambda: run_harness(str(model_dir), settings.harness_tasks, settings.include_path,
                                             settings.harness_limit, device=str(next(model.parameters()).device)))
    (out / "results.json").write_text(json.dumps(_finite(results), indent=2) + "\n")
    return results


def _finite(value):
    """NaN/inf as None, so results.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _plot_quantization(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3))
    left.plot(names, [result[n]["loss"] for n in names], marker="o")
    left.set_xlabel("attention logit bits")
    left.set_ylabel("held-out loss (nats/token)")
    left.ticklabel_format(axis="y", useOffset=False)
    right.plot(names, [result[n]["needle_accuracy"] for n in names], marker="o")
    right.set_xlabel("attention logit bits")
    right.set_ylabel("needle accuracy")
    right.set_ylim(-0.05, 1.05)
    fig.suptitle("robustness to fake-quantised attention logits")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(results: dict) -> str:
    """The one-screen text summary of :func:`evaluate`'s results."""
    lines = [f"eval of {results['model']}"]
    if "perplexity" in results:
        p = results["perplexity"]
        lines.append(f"perplexity   {p['nats_per_token']:.4f} nats/token = {p['bits_per_byte']:.3f} bits/byte "
                     f"(ppl {p['perplexity']:.2f}, {p['tokens']:,} tokens)")
    if results.get("needle_skipped"):
        lines.append(f"needle       skipped (needles + question longer than the context): "
                     f"{', '.join(results['needle_skipped'])}")
    if "needle" in results:
        for cell, data in results["needle"].items():
            by_length = "  ".join(f"{k}: {v:.2f}" for k, v in data["by_length"].items())
            lines.append(f"needle N,R={cell:<4} accuracy {data['overall']:.2f}   by length  {by_length}")
    if "attention" in results:
        a = results["attention"]
        per_layer = " ".join(f"{p['answer']:.2f}/{p['noise']:.2f}" for p in a["per_layer"])
        lines.append(f"attention    answer {a['answer']:.3f}, noise {a['noise']:.3f} (per layer "
                     f"answer/noise: {per_layer})")
    if "outliers" in results:
        for name in ("attention_logits", "hidden_states"):
            s = results["outliers"][name]
            lines.append(f"outliers     |{name}|: top1 {s['top1']:.2f} top2 {s['top2']:.2f} top3 {s['top3']:.2f} "
                         f"top10 {s['top10']:.2f} top100 {s['top100']:.2f} median {s['median']:.3f}")
    if "quantization" in results:
        q = results["quantization"]
        lines.append("quantization " + "  ".join(f"{k}: loss {v['loss']:.3f} needle {v['needle_accuracy']:.2f}"
                                                 for k, v in q.items()))
    if "icl" in results:
        i = results["icl"]
        lines.append(f"icl          {i['skipped']}" if "skipped" in i else
                     f"icl          {i['k']}-shot over {len(i['accuracies'])} orders: mean {i['mean']:.3f}, best "
                     f"{i['best']:.3f}, worst {i['worst']:.3f}, spread {i['spread']:.3f} (majority {i['chance']:.3f})")
    if "harness" in results:
        for task, metrics in results["harness"].items():
            shown = ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))
            lines.append(f"harness      {task}: {shown}")
    lines.append("time         " + ", ".join(f"{k} {v:.1f} s" for k, v in results["timings_s"].items()))
    return "\n".join(lines)
