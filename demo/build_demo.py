"""Rebuild the bundled demo training set from the original releases in ../shared/data.

    python demo/build_demo.py [--shared ../shared/data]

Writes demo/train.jsonl in MediX-R1's training format (id, image, source, problem, solution) with
images copied under demo/images/, and demo/pubmedqa/ (64 PubMedQA questions kept out of training, in
PubMedQA's release format: the demo's validation set, --eval_data PubMedQA --eval_data_root demo, and
evaluate.py's with --data_root demo). All real data:
- SLAKE 1.0 English training questions (CT, MRI, X-ray images): the tag comes from SLAKE's own
  `modality` field. CC BY 4.0, Liu et al., ISBI 2021 (licences in demo/LICENSES.md).
- PubMedQA PQA-L questions outside its 500-id test split, text only, tag OTHER; the answer is the
  expert decision (yes / no / maybe), so accuracy is scorable without a judge. MIT, Jin et al. 2019.
"""
import argparse
import json
import random
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent
SLAKE_TAG = {"CT": "CT_SCAN", "MRI": "MRI_SCAN", "X-Ray": "X_RAY"}
N_PUBMEDQA_TRAIN, N_PUBMEDQA_HELDOUT = 48, 64


def pubmedqa_problem(item: dict) -> str:
    context = " ".join(item["CONTEXTS"])
    return f"Context: {context}\nQuestion: {item['QUESTION']}\nAnswer yes, no or maybe."


def main(shared: Path):
    rows = []
    for q in json.loads((shared / "slake" / "train.json").read_text()):
        if q["q_lang"] != "en":
            continue
        dest = HERE / "images" / "slake" / q["img_name"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shared / "slake" / "imgs" / q["img_name"], dest)
        rows.append({
            "id": f"slake-{q['qid']}", "image": [str(dest.relative_to(HERE))], "source": "slake",
            "problem": q["question"], "solution": f"<{SLAKE_TAG[q['modality']]}> {q['answer']}",
        })  # fmt: skip
    pqa = json.loads((shared / "pubmedqa" / "ori_pqal.json").read_text())
    test_ids = set(json.loads((shared / "pubmedqa" / "test_ground_truth.json").read_text()))
    pool = sorted(set(pqa) - test_ids)
    random.Random(0).shuffle(pool)
    def row(pmid):
        return {"id": f"pubmedqa-{pmid}", "image": [], "source": "pubmedqa",
                "problem": pubmedqa_problem(pqa[pmid]), "solution": f"<OTHER> {pqa[pmid]['final_decision']}",
                "long_answer": pqa[pmid]["LONG_ANSWER"]}  # fmt: skip
    rows += [row(p) for p in pool[:N_PUBMEDQA_TRAIN]]
    with open(HERE / "train.jsonl", "w") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    # The held-out questions in PubMedQA's own release format, so evaluate.py (and the trainer's
    # validation, which runs its stages) loads them as the PubMedQA benchmark: --data_root demo.
    held = pool[N_PUBMEDQA_TRAIN : N_PUBMEDQA_TRAIN + N_PUBMEDQA_HELDOUT]
    (HERE / "pubmedqa").mkdir(exist_ok=True)
    (HERE / "pubmedqa" / "ori_pqal.json").write_text(json.dumps({p: pqa[p] for p in held}, ensure_ascii=False))
    (HERE / "pubmedqa" / "test_ground_truth.json").write_text(json.dumps({p: pqa[p]["final_decision"] for p in held}))
    print(f"demo: {len(rows)} training samples, {len(held)} held out")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--shared", type=Path, default=HERE.parent.parent / "shared" / "data")
    main(ap.parse_args().shared)
