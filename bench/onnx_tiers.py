"""The ONNX middle tier: encoder speed and imitation quality, and the cascade curves with and without it.

    python bench/onnx_tiers.py [--data-dir ../shared/data] [--jobs 2] [--quick] [--head-ngrams 262144] [--order file]

1. Encoders (built-in minilm-l3 and minilm-l6-int8): events per second per core (one onnxruntime
   thread, batch 32, encoder + head) and imitation quality: prequential agreement with the LLM of
   a softmax head that predicts each event, then learns the LLM's answer (every event a
   demonstration), next to the logistic tier under the same protocol.
2. For isear and hatespeech (shuffled, seed 0) and both LLMs, the accuracy (and hate recall)
   against LLM-call fraction of logistic → LLM and logistic → ONNX → LLM in the same run, swept
   over mu (and for hatespeech also miss_costs {"hate": 3}), with `cascade.evaluation.simulate`.

Embeddings are computed once per dataset and encoder and cached in bench/out/emb-*.npz (keyed
by the text's sha1 and the encoder's fingerprint); the simulations read them through the tier's
`embedding_cache`, so the curves cost head + policy time only. Writes bench/out/onnx_tiers.json.

``--head-ngrams N`` runs the ONNX tier with hashed word uni-/bigrams (N buckets) beside the
embedding in its head (OnnxTierConfig.head_ngrams), and adds that head to the imitation table.
``--order file`` streams the rows in file order instead of shuffled with seed 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cascade.config import OnnxTierConfig, load_config
from cascade.evaluation.data import labels_of, read_stream
from cascade.evaluation.simulate import simulate
from cascade.tiers.encoders import BUILTIN_ENCODERS, SentenceEncoder, resolve_encoder
from cascade.tiers.logistic import LogisticTier
from cascade.tiers.onnx import OnnxTier, text_key

GPT, LLAMA = "gpt-3.5-turbo-1106", "llama-2-70b-chat"
OUT = Path(__file__).parent / "out"
COSTS = {"logistic": 1.0, "onnx": 5.0, "llm": 100.0}
MUS = {"isear": [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.325, 0.35, 0.4], "hatespeech": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}
MISS_COSTS = {"isear": [{}], "hatespeech": [{}, {"hate": 3.0}]}
DEFAULT_ENCODER = "minilm-l6-int8"


def cache_path(dataset: str, encoder: str) -> Path:
    return OUT / f"emb-{dataset}-{encoder}.npz"


def ensure_cache(data_dir: str, dataset: str, encoder: str) -> Path:
    model, tok = resolve_encoder(encoder, None, None)
    enc = SentenceEncoder(model, tok, batch_size=32, threads=1)
    path = cache_path(dataset, encoder)
    if path.exists():
        with np.load(path) as z:
            if str(z["fingerprint"]) == enc.fingerprint:
                return path
    rows = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz")
    texts = sorted({r.event.text for r in rows})
    start = time.perf_counter()
    emb = enc.encode(texts)
    print(f"  embedded {dataset} with {encoder}: {len(texts)} texts in {time.perf_counter() - start:.0f} s", file=sys.stderr)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, keys=np.array([text_key(t) for t in texts]), embeddings=emb, fingerprint=np.array(enc.fingerprint))
    return path


def speed(data_dir: str, encoder: str, n: int = 1000, head: dict[str, Any] | None = None) -> dict[str, float]:
    """Events per second on one core: prepare (tokenise + encode) and predict_proba of a learned head."""
    rows = read_stream(Path(data_dir) / "isear.jsonl.gz", shuffle_seed=0)[:n]
    labels = sorted(labels_of(rows))
    tier = OnnxTier(OnnxTierConfig(name="onnx", encoder=encoder, threads=1, batch_size=32, **(head or {})), labels)
    events = [r.event for r in rows]
    tier.prepare(events[:64])
    start = time.perf_counter()
    inputs = tier.prepare(events)
    t_enc = time.perf_counter() - start
    tier.learn(inputs[:64], [r.event.payload["llm"][GPT] or labels[0] for r in rows[:64]])
    start = time.perf_counter()
    for i in range(0, n, 32):
        tier.predict_proba(inputs[i : i + 32])
    t_head = time.perf_counter() - start
    return {"encoder_ev_s": n / t_enc, "head_ev_s": n / t_head, "tier_ev_s": n / (t_enc + t_head)}


def imitation(data_dir: str, dataset: str, llm: str, encoder: str | None, head: dict[str, Any] | None = None) -> dict[str, Any]:
    """Prequential agreement with the LLM when every event is a demonstration (predict, then learn).

    Also an optimistic bound on any cascade over this tier at 45% LLM calls (``bound_at_45``):
    gold accuracy when this tier, taught *every* LLM answer, answers the 55% of events it is most
    confident about (a threshold chosen after the fact) and the LLM the rest. A cascade's tier
    learns only from the events sent up, and its policy must pick the threshold online.
    """
    rows = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz", shuffle_seed=0)
    labels = sorted(labels_of(rows))
    config = load_config(None, task={"name": dataset, "labels": labels})
    if encoder is None:
        tier: Any = LogisticTier(config.tiers[0], labels, config.features)
    else:
        tier = OnnxTier(OnnxTierConfig(name="onnx", encoder=encoder,
                                       embedding_cache=cache_path(dataset, encoder), **(head or {})), labels)
    agree = seen = 0
    curve = []
    conf, tier_right, llm_right = [], [], []
    for r in rows:
        y = r.event.payload["llm"][llm]
        if y is None:
            continue
        x = tier.prepare([r.event])
        p = tier.predict_proba(x)[0]
        agree += labels[int(np.argmax(p))] == y
        seen += 1
        conf.append(float(p.max()))
        tier_right.append(labels[int(np.argmax(p))] == r.gold)
        llm_right.append(y == r.gold)
        tier.learn(x, [y])
        if seen in (500, 1000, 2000, 4000):
            curve.append((seen, agree / seen))
    name = (encoder or "logistic") + ("+ngrams" if head and head.get("head_ngrams") else "")
    c, t, g = np.array(conf), np.array(tier_right), np.array(llm_right)
    answered = np.zeros(len(c), dtype=bool)
    answered[np.argsort(-c, kind="stable")[: int(round(0.55 * len(c)))]] = True
    bound = float(np.where(answered, t, g).mean())
    return {"dataset": dataset, "llm": llm, "tier": name, "agreement": agree / seen, "curve": curve,
            "bound_at_45": bound}


def run_point(data_dir: str, dataset: str, llm: str, mu: float, miss: dict[str, float], three: bool, encoder: str,
              head: dict[str, Any] | None = None, order_seed: int | None = 0) -> dict[str, Any]:
    rows = read_stream(Path(data_dir) / f"{dataset}.jsonl.gz", shuffle_seed=order_seed)
    tiers: list[dict[str, Any]] = [{"name": "logistic", "kind": "logistic", "cost": COSTS["logistic"]}]
    if three:
        tiers.append({"name": "onnx", "kind": "onnx", "cost": COSTS["onnx"], "encoder": encoder,
                      "embedding_cache": str(cache_path(dataset, encoder)), **(head or {})})
    config = load_config(
        None,
        task={"name": dataset, "labels": sorted(labels_of(rows)), "miss_costs": miss},
        tiers=tiers, llm={"name": llm, "cost": COSTS["llm"]}, deferral={"mu": mu},
    )
    r = simulate(config, rows, progress=False)
    hate = r.per_class.get("hate")
    return {
        "dataset": dataset, "llm": llm, "cascade": "3-tier" if three else "2-tier", "mu": mu, "miss_costs": miss,
        "llm_call_fraction": r.llm_call_fraction, "accuracy": r.accuracy, "macro_f1": r.macro_f1,
        "llm_accuracy": r.llm_accuracy, "hate_recall": hate.recall if hate else None,
        "order": "file" if order_seed is None else f"shuffled({order_seed})", "head": head or {},
        "agreement_with_llm": r.agreement_with_llm, "seconds": r.seconds if hasattr(r, "seconds") else None,
    }


def calls_for(level: float, curve: list[dict[str, Any]], metric: str) -> float | None:
    """The smallest LLM-call fraction at which the curve reaches ``level`` (interpolated), or None."""
    pts = sorted((p["llm_call_fraction"], p[metric]) for p in curve)
    best = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if y0 >= level:
            best = x0 if best is None else min(best, x0)
        elif y1 >= level:
            x = x0 + (level - y0) * (x1 - x0) / (y1 - y0)
            best = x if best is None else min(best, x)
    if pts and pts[-1][1] >= level:
        best = pts[-1][0] if best is None else min(best, pts[-1][0])
    return best


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--encoder", default=DEFAULT_ENCODER, choices=sorted(BUILTIN_ENCODERS))
    ap.add_argument("--quick", action="store_true", help="skip the encoder comparison; fewer mu values")
    ap.add_argument("--head-ngrams", type=int, default=0, help="OnnxTierConfig.head_ngrams of the ONNX tier (0: embedding only)")
    ap.add_argument("--order", choices=["shuffled", "file"], default="shuffled", help="stream order (shuffled: seed 0)")
    ap.add_argument("--out", default=str(OUT / "onnx_tiers.json"))
    args = ap.parse_args()
    head = {"head_ngrams": args.head_ngrams} if args.head_ngrams else {}
    order_seed = None if args.order == "file" else 0
    data_dir = Path(args.data_dir)
    if not (data_dir / "isear.jsonl.gz").exists() or not (data_dir / "hatespeech.jsonl.gz").exists():
        print(f"SKIP: data files not found in {data_dir} (see ../shared/data/README.md)", file=sys.stderr)
        return 0
    dd = str(data_dir)
    started = time.perf_counter()
    encoders = [args.encoder] if args.quick else sorted(BUILTIN_ENCODERS)
    for enc in encoders:
        for dataset in ("isear", "hatespeech"):
            ensure_cache(dd, dataset, enc)
    result: dict[str, Any] = {"costs": COSTS, "encoder": args.encoder, "head": head, "order": args.order}

    print("\nencoders (one onnxruntime thread, batch 32; imitation = prequential agreement with the LLM, every event learned;\n"
          "in brackets the bound on a cascade's gold accuracy at 45% LLM calls, see imitation()):")
    speeds = {enc: speed(dd, enc) for enc in encoders}
    if head:
        speeds[args.encoder + "+ngrams"] = speed(dd, args.encoder, head=head)
    variants = [(None, None)] + [(enc, None) for enc in encoders] + ([(args.encoder, head)] if head else [])
    jobs = [(dd, ds, llm, enc, h) for ds in ("isear", "hatespeech") for llm in (GPT, LLAMA) for enc, h in variants]
    with ProcessPoolExecutor(args.jobs) as pool:
        imit = list(pool.map(imitation, *zip(*jobs)))
    print(f"{'tier':<22}{'enc ev/s/core':>14}{'tier ev/s/core':>15}" + "".join(f"{j[1][:5] + '/' + j[2][:5]:>17}" for j in jobs[:: len(variants)]))
    for tier in ["logistic", *encoders] + ([args.encoder + "+ngrams"] if head else []):
        s = speeds.get(tier)
        cols = [f"{p['agreement']:>8.4f} ({p['bound_at_45']:.3f})" for p in imit if p["tier"] == tier]
        enc_s = f"{s['encoder_ev_s']:.0f}" if s else "-"
        tier_s = f"{s['tier_ev_s']:.0f}" if s else "-"
        print(f"{tier:<22}{enc_s:>14}{tier_s:>15}" + "".join(cols))
    result["speed"], result["imitation"] = speeds, imit

    points_jobs = []
    for dataset in ("isear", "hatespeech"):
        mus = MUS[dataset][::2] if args.quick else MUS[dataset]
        for llm in (GPT, LLAMA):
            for miss in MISS_COSTS[dataset]:
                for mu in mus:
                    for three in (False, True):
                        points_jobs.append((dd, dataset, llm, mu, miss, three, args.encoder, head, order_seed))
    print(f"\n{len(points_jobs)} cascade runs on {args.jobs} processes (costs {COSTS}) ...", file=sys.stderr)
    with ProcessPoolExecutor(args.jobs) as pool:
        points = list(pool.map(run_point, *zip(*points_jobs)))
    result["points"] = points
    print(f"\n{'dataset':<11}{'llm':<19}{'miss':<9}{'mu':>5} | {'2-tier LLM%':>11}{'acc':>8}{'hateR':>7} | "
          f"{'3-tier LLM%':>11}{'acc':>8}{'hateR':>7} | {'LLM calls 3/2':>13}{'LLM acc':>9}")
    for two, three in zip(points[::2], points[1::2]):
        miss = ",".join(f"{k}={v:g}" for k, v in two["miss_costs"].items()) or "-"
        hr = lambda p: f"{p['hate_recall']:.3f}" if p["hate_recall"] is not None else "-"  # noqa: E731
        ratio = three["llm_call_fraction"] / max(two["llm_call_fraction"], 1e-9)
        print(f"{two['dataset']:<11}{two['llm']:<19}{miss:<9}{two['mu']:>5} | {two['llm_call_fraction']:>11.1%}"
              f"{two['accuracy']:>8.4f}{hr(two):>7} | {three['llm_call_fraction']:>11.1%}{three['accuracy']:>8.4f}"
              f"{hr(three):>7} | {ratio:>13.2f}{two['llm_accuracy']:>9.4f}")

    print("\nLLM-call fraction needed for a given quality (linear interpolation along each curve), 3-tier / 2-tier:")
    for dataset, llm, miss, metric in [("isear", GPT, {}, "accuracy"), ("isear", LLAMA, {}, "accuracy"),
                                       ("hatespeech", GPT, {"hate": 3.0}, "hate_recall"),
                                       ("hatespeech", LLAMA, {"hate": 3.0}, "hate_recall")]:
        curve = [p for p in points if p["dataset"] == dataset and p["llm"] == llm and p["miss_costs"] == miss]
        if not curve:
            continue
        ref = curve[0]["llm_accuracy"] if metric == "accuracy" else None
        levels = [ref - 0.015, ref - 0.03] if ref is not None else [0.80, 0.76]
        for level in levels:
            need = {kind: calls_for(level, [p for p in curve if p["cascade"] == kind], metric) for kind in ("2-tier", "3-tier")}
            two, three = need["2-tier"], need["3-tier"]
            ratio = f"{three / two:.2f}" if two and three else "-"
            fmt = lambda v: f"{v:.1%}" if v is not None else "beyond the sweep"  # noqa: E731
            print(f"  {dataset}/{llm} {metric} >= {level:.4f}: 2-tier {fmt(two)}, 3-tier {fmt(three)}, ratio {ratio}")

    print("\ntargets:")
    isear = [p for p in points if p["dataset"] == "isear" and p["llm"] == GPT]
    for kind in ("2-tier", "3-tier"):
        ok = [p for p in isear if p["cascade"] == kind and p["llm_call_fraction"] <= 0.45]
        best = max(ok, key=lambda p: p["accuracy"], default=None)
        llm_acc = isear[0]["llm_accuracy"]
        print(f"  ISEAR/GPT-3.5 {kind}: best accuracy at <= 45% LLM calls: "
              + (f"{best['accuracy']:.4f} at {best['llm_call_fraction']:.1%} (mu {best['mu']}); LLM alone {llm_acc:.4f}, "
                 f"target >= {llm_acc - 0.015:.4f}: {'MET' if best['accuracy'] >= llm_acc - 0.015 else 'not met'}" if best else "none"))
    hate = [p for p in points if p["dataset"] == "hatespeech" and p["llm"] == LLAMA]
    for kind in ("2-tier", "3-tier"):
        ok = [p for p in hate if p["cascade"] == kind and p["llm_call_fraction"] <= 0.30]
        best = max(ok, key=lambda p: p["hate_recall"], default=None)
        print(f"  hatespeech/Llama-2 {kind}: best hate recall at <= 30% LLM calls: "
              + (f"{best['hate_recall']:.3f} at {best['llm_call_fraction']:.1%} (mu {best['mu']}, miss {best['miss_costs']}), "
                 f"target >= 0.76: {'MET' if best['hate_recall'] >= 0.76 else 'not met'}" if best else "none"))
    print(f"\ntook {time.perf_counter() - started:.0f} s", file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
