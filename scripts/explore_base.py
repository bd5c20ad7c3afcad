"""Dev script: pretrain (or load) the demo's base model and measure the properties LaTRO needs.

Measures greedy direct-answer accuracy, how often greedy decoding reasons, accuracy when the
model is forced to start a rationale, and accuracy / reasoning rate of rationales sampled at
a temperature (what LaTRO's RLOO sees).  Training LaTRO on a base is `latro demo`'s job.

    .venv/bin/python scripts/explore_base.py --steps 900 --batch-size 16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from collections import Counter

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from latro_engine.base_model import (
    BaseSettings,
    PretrainSettings,
    load_or_pretrain_base,
    read_base_metadata,
)
from latro_engine.synthetic import (
    QAPair,
    answers_match,
    extract_answer,
    format_prompt,
    generate_pairs,
    is_worked,
)

log = logging.getLogger("explore_base")


class ForceDigitAt(LogitsProcessor):
    """Allow only digit tokens at one generation position (forces a rationale to start)."""

    def __init__(self, position: int, digit_ids: list[int]) -> None:
        self.position, self.digit_ids = position, digit_ids

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] == self.position:
            keep = torch.full_like(scores, float("-inf"))
            keep[:, self.digit_ids] = 0
            scores = scores + keep
        return scores


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    force: bool = False,
    k: int = 1,
    temperature: float = 0.0,
    max_new: int = 64,
    batch: int = 256,
) -> list[str]:
    """Completions (k per prompt, grouped by prompt) decoded greedily or by sampling."""
    out: list[str] = []
    digits = [tok.convert_tokens_to_ids(str(d)) for d in range(10)]  # " 3." starts a rationale
    for i in range(0, len(prompts), batch):
        enc = tok(prompts[i : i + batch], return_tensors="pt", padding=True)
        width = enc["input_ids"].shape[1]
        procs = LogitsProcessorList([ForceDigitAt(width + 1, digits)] if force else [])
        kw = (
            dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            if temperature > 0
            else dict(do_sample=False)
        )
        gen = model.generate(
            **enc,
            max_new_tokens=max_new,
            num_return_sequences=k,
            logits_processor=procs,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **kw,
        )
        out += tok.batch_decode(gen[:, width:], skip_special_tokens=True)
    return out


def probe(
    model, tok, pairs: list[QAPair], k: int = 8, temperature: float = 0.7
) -> dict[str, float]:
    """Greedy / forced / sampled accuracies and reasoning rates on ``pairs``."""
    prompts = [format_prompt(p.question) for p in pairs]
    gold = [p.answer for p in pairs]
    res: dict[str, float] = {}
    t = time.perf_counter()
    greedy = generate(model, tok, prompts)
    res["greedy_acc"] = sum(
        answers_match(extract_answer(c), g) for c, g in zip(greedy, gold, strict=True)
    ) / len(gold)
    res["greedy_reason_rate"] = sum(map(is_worked, greedy)) / len(gold)
    forced = generate(model, tok, prompts, force=True)
    res["forced_acc"] = sum(
        answers_match(extract_answer(c), g) for c, g in zip(forced, gold, strict=True)
    ) / len(gold)
    sub = pairs[: min(len(pairs), 200)]
    samples = generate(
        model, tok, [format_prompt(p.question) for p in sub], k=k, temperature=temperature
    )
    ok = [answers_match(extract_answer(c), sub[j // k].answer) for j, c in enumerate(samples)]
    worked = [is_worked(c) for c in samples]
    res["sample_acc"] = sum(ok) / len(ok)
    res["sample_reason_rate"] = sum(worked) / len(worked)
    n_worked = sum(worked)
    hits_worked = sum(o for o, w in zip(ok, worked, strict=True) if w)
    res["sample_acc_when_reasoning"] = hits_worked / max(1, n_worked)
    res["sample_acc_when_direct"] = (sum(ok) - hits_worked) / max(1, len(ok) - n_worked)
    votes = 0
    for j, p in enumerate(sub):
        answers = [extract_answer(c) for c in samples[j * k : (j + 1) * k]]
        top = Counter(a for a in answers if a is not None).most_common(1)
        votes += bool(top) and answers_match(top[0][0], p.answer)
    res[f"maj@{k}"] = votes / len(sub)
    res["probe_s"] = time.perf_counter() - t
    log.info("examples: %r | %r", greedy[:2], forced[:2])
    return {key: round(v, 4) for key, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--direct-fraction", type=float, default=None)
    ap.add_argument("--reasoning-warmup", type=float, default=None)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = BaseSettings(
        pretrain=PretrainSettings(
            steps=args.steps,
            batch_size=args.batch_size,
            lr=args.lr,
            warmup_steps=args.warmup,
            weight_decay=args.weight_decay,
        ),
        num_threads=args.threads,
    )
    if args.direct_fraction is not None:
        s = dataclasses.replace(
            s, corpus=dataclasses.replace(s.corpus, direct_fraction=args.direct_fraction)
        )
    if args.reasoning_warmup is not None:
        s = dataclasses.replace(
            s, corpus=dataclasses.replace(s.corpus, reasoning_warmup=args.reasoning_warmup)
        )
    if args.hidden or args.layers:
        m = dataclasses.replace(
            s.model,
            hidden_size=args.hidden or s.model.hidden_size,
            num_layers=args.layers or s.model.num_layers,
            intermediate_size=int(2.75 * (args.hidden or s.model.hidden_size)),
        )
        s = dataclasses.replace(s, model=m)
    model, tok, path = load_or_pretrain_base(s)
    log.info("base at %s: %s", path, read_base_metadata(path)["metrics"])
    test = generate_pairs(args.n_test, 0, s.task, "heldout")
    log.info("base probe: %s", json.dumps(probe(model, tok, test)))


if __name__ == "__main__":
    main()
