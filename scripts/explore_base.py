"""Dev script: pretrain (or load) the demo's base model and measure the properties LaTRO needs.

Measures greedy direct-answer accuracy, how often greedy decoding reasons, accuracy when the
model is forced to start a rationale, and accuracy / reasoning rate of rationales sampled at
a temperature (what LaTRO's RLOO sees).  Optionally runs a bare-bones LaTRO prototype to check
learnability; the real trainer lives elsewhere.

    .venv/bin/python scripts/explore_base.py --steps 900 --batch-size 16 [--latro-steps 100]
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
    ANSWER_PREFIX,
    QAPair,
    answers_match,
    extract_answer,
    format_answer,
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


def latro_prototype(
    model,
    tok,
    train: list[QAPair],
    test: list[QAPair],
    steps: int,
    k: int = 8,
    n_q: int = 16,
    temperature: float = 0.7,
    lr: float = 1e-4,
    beta: float = 0.05,
) -> None:
    """Minimal LaTRO (RLOO on log p(y|x,z) with a KL-to-reference term) to check learnability."""
    import copy

    ref = copy.deepcopy(model).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    for step in range(steps):
        qs = [train[(step * n_q + i) % len(train)] for i in range(n_q)]
        model.eval()
        comps = generate(
            model,
            tok,
            [format_prompt(q.question) for q in qs],
            k=k,
            temperature=temperature,
            max_new=48,
        )
        seqs, spans = [], []
        for j, c in enumerate(comps):
            q = qs[j // k]
            z = c.split(ANSWER_PREFIX, 1)[0] if ANSWER_PREFIX in c else c[:40]
            x = tok(format_prompt(q.question))["input_ids"]
            zi = tok(z, add_special_tokens=False)["input_ids"]
            yi = tok(format_answer(q.answer), add_special_tokens=False)["input_ids"] + [
                tok.eos_token_id
            ]
            seqs.append(x + zi + yi)
            spans.append(
                (len(x), len(x) + len(zi), len(x) + len(zi) + len(yi), ANSWER_PREFIX not in c)
            )
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_token_id)
        zmask = torch.zeros(len(seqs), width - 1)
        ymask = torch.zeros(len(seqs), width - 1)
        for i, (s, (a, b, e, _)) in enumerate(zip(seqs, spans, strict=True)):
            ids[i, : len(s)] = torch.tensor(s)
            zmask[i, a - 1 : b - 1] = 1
            ymask[i, b - 1 : e - 1] = 1
        attn = (ids != tok.pad_token_id).long()
        model.train()
        logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float()
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]
        with torch.no_grad():
            rlp = torch.log_softmax(
                ref(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1
            )
            rlp = rlp.gather(-1, ids[:, 1:, None])[..., 0]
            logp_z = (lp * zmask).sum(1)
            r = (lp * ymask).sum(1) - beta * (logp_z - (rlp * zmask).sum(1))
            nonstop = torch.tensor([s[3] for s in spans])
            r = torch.where(nonstop, r.new_tensor(-20.0), r).view(n_q, k)
            adv = (r - (r.sum(1, keepdim=True) - r) / (k - 1)).view(-1)
        loss = -(adv * (lp * zmask).sum(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps - 1:
            log.info(
                "latro step %d reward %.3f reason-rate %.2f (%.0fs)",
                step,
                float(r.mean()),
                sum(map(is_worked, comps)) / len(comps),
                time.perf_counter() - t0,
            )
    model.eval()
    log.info(
        "latro after %d steps (%.0fs): %s",
        steps,
        time.perf_counter() - t0,
        json.dumps(probe(model, tok, test)),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--direct-fraction", type=float, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--latro-steps", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    s = BaseSettings(
        pretrain=PretrainSettings(steps=args.steps, batch_size=args.batch_size, lr=args.lr),
        num_threads=args.threads,
    )
    if args.direct_fraction is not None:
        s = dataclasses.replace(
            s, corpus=dataclasses.replace(s.corpus, direct_fraction=args.direct_fraction)
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
    if args.latro_steps:
        latro_prototype(
            model, tok, generate_pairs(2000, 0, s.task, "train"), test, args.latro_steps
        )


if __name__ == "__main__":
    main()
