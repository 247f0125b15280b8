"""Regenerate the bundled demo data: ``python -m align.demo.generate``.

Addition of two numbers in 0..49, in chat form. Each (a, b) pair lands in exactly one split, so
the eval split is held out. Rejected/undesirable answers skip the working and are off by 1 to 3
("It is 39."): a preference a tiny model can learn from pairs within a short CPU run. Feedback
data alternates desirable and undesirable examples, so the classes are balanced. Ranked data
gives each question three answers in shuffled order, scored 2 (right, with the working), 1 (off
by 1) and 0 (off by 5 to 9), drawn from a generator of its own so the other files stay as they
were. Prompt-only data (on-policy objectives: GRPO, online DPO) holds the question and its
``answer``, which the ``addition`` reward reads.
"""

from __future__ import annotations

import json
import random

from . import DEMO_DIR


def _question(a: int, b: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"What is {a} + {b}?"}]


def _answer(a: int, b: int, total: int) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"{a} + {b} = {total}."}]


def _bad_answer(total: int) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": f"It is {total}."}]


def _ranked(rng: random.Random, a: int, b: int) -> dict:
    near = a + b + rng.choice([-1, 1]) if a + b else 1
    far = a + b + rng.randint(5, 9)
    scored = [(_answer(a, b, a + b), 2.0), (_bad_answer(near), 1.0), (_bad_answer(far), 0.0)]
    rng.shuffle(scored)
    return {
        "prompt": _question(a, b),
        "completions": [answer for answer, _ in scored],
        "scores": [score for _, score in scored],
    }


def main() -> None:
    rng = random.Random(1234)
    pairs = [(a, b) for a in range(50) for b in range(50)]
    rng.shuffle(pairs)
    splits = {"train": pairs[:2000], "eval": pairs[2000:2200]}
    ranked_rng = random.Random(4321)
    for split, chosen in splits.items():
        rows = {
            "prompt_completion": [],
            "preference": [],
            "feedback": [],
            "ranked": [],
            "prompt_only": [],
        }
        for a, b in chosen:
            wrong = a + b + rng.choice([-3, -2, -1, 1, 2, 3])
            wrong = wrong if wrong >= 0 else a + b + 1
            rows["prompt_completion"].append({"messages": _question(a, b) + _answer(a, b, a + b)})
            rows["preference"].append(
                {
                    "prompt": _question(a, b),
                    "chosen": _answer(a, b, a + b),
                    "rejected": _bad_answer(wrong),
                }
            )
            good = len(rows["feedback"]) % 2 == 0  # balanced classes, as KTO advises
            rows["feedback"].append(
                {
                    "prompt": _question(a, b),
                    "completion": _answer(a, b, a + b) if good else _bad_answer(wrong),
                    "label": good,
                }
            )
            rows["ranked"].append(_ranked(ranked_rng, a, b))
            rows["prompt_only"].append({"prompt": _question(a, b), "answer": a + b})
        for fmt, records in rows.items():
            with open(DEMO_DIR / f"{fmt}_{split}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record) + "\n")


if __name__ == "__main__":
    main()
