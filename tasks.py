"""Benchmarks from task files (added without editing data.py), benchmark names, and `--benchmarks list`.

    python evaluate.py --benchmarks my_task.yaml,PubMedQA ...     # a task file, beside the built-in ones
    python evaluate.py --tasks_dir my_tasks/ --benchmarks MyQA ...  # every *.yaml / *.json there, by name
    python evaluate.py --benchmarks list --data_root benchmarks      # names, groups, where each one's data is

A task file (YAML or JSON) names one benchmark and how to read it with one of data.py's loaders:

    name: MyQA                 # the report's row name (a built-in name is refused)
    format: mmlu               # the loader: a key of FORMATS (mmlu = question, choices, answer index/letter)
    data: myqa.jsonl           # .jsonl / .json / .csv / .parquet / save_to_disk folder, relative to this file
    # hf_id: org/dataset       # ... or a Hugging Face dataset (config:, split: test)
    fields: {question: stem, choices: options, answer: gold}   # the loader's column <- this file's column
    template: BASE             # optional: BASE (judged 0/1) or MIMIC (0-5 rubric), as the format's kind says
    metric: accuracy           # optional: accuracy (correct / N) or rubric (points / 5 N), the same
    group: LLM                 # optional: LLM (text only) or VLM (images), else the format's

Relative image paths in the data are read from the data file's folder. evaluate.py keeps each task's
resolved spec in the run's manifest.json, so later stages need only the folder. Names are matched
whatever their case (`pubmedqa` is PubMedQA). A bad task file stops in one line naming file and key.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import data
from data import BENCHMARKS, Benchmark, DataError

TASK_SUFFIXES = (".yaml", ".yml", ".json")


def _conv_open(b, row, n, root, file):
    """Open-ended QA: question, answer, and an optional image (a path or encoded image)."""
    sid = f"{b.name}-{row.get('id') if row.get('id') is not None else n}"
    images = [data._image_cell(row["image"])] if row.get("image") is not None else []
    return data.Sample(
        id=sid, question=data._text(row.get("question"), "question", sid, file), answer=data._text(row.get("answer"), "answer", sid, file),
        images=images, source=b.name, kind="open", meta={"file": file},
    )  # fmt: skip


# format -> (data.py's converter, kind, images, the columns it reads)
FORMATS = {
    "mmlu": (data._conv_mmlu, "mcq", False, "question, choices (list), answer (index 0-based or letter)"),
    "medmcqa": (data._conv_medmcqa, "mcq", False, "question, opa-opd, cop (0-3)"),
    "medqa": (data._conv_medqa, "mcq", False, "question, options {A: ...}, answer_idx (or sent1, ending0-3, label)"),
    "usmle": (data._conv_usmle, "mcq", False, "question, options {A: ...}, answer, answer_idx"),
    "pubmedqa": (data._conv_pubmedqa, "mcq", False, "QUESTION, CONTEXTS, final_decision (yes/no/maybe), LONG_ANSWER"),
    "pmc_vqa": (data._conv_pmc_vqa, "mcq", True, "image, question, choices, answer"),
    "image_qa": (data._conv_image_qa, "open", True, "image, question, answer"),
    "open": (_conv_open, "open", False, "question, answer, image (optional)"),
    "mimic_sum": (data._conv_mimic_sum, "report", False, "report, summary"),
    "mimic_gen": (data._conv_mimic_gen, "report", True, "image, report"),
}
_KEYS = ("name", "format", "data", "hf_id", "config", "split", "fields", "template", "metric", "group")
_TEMPLATE = {"mcq": ("BASE", "accuracy"), "open": ("BASE", "accuracy"), "report": ("MIMIC", "rubric")}


def read_task(path: str | Path) -> dict:
    """A task file as a checked spec with absolute paths (what the manifest keeps)."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"task file {path}: no such file")
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
        spec = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as e:
        kind = "JSON" if path.suffix == ".json" else "YAML"
        raise SystemExit(f"task file {path}: not valid {kind} ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(spec, dict):
        raise SystemExit(f"task file {path}: expected key: value pairs ({', '.join(_KEYS)})")
    bad = sorted(set(spec) - set(_KEYS))
    if bad:
        raise SystemExit(f"task file {path}: unknown keys {', '.join(bad)} (known: {', '.join(_KEYS)})")
    name = str(spec.get("name") or "").strip()
    if not name or any(c in name for c in "/\\,"):
        raise SystemExit(f"task file {path}: 'name' is needed, without / \\ or commas (it names a file and a report row)")
    fmt = spec.get("format")
    if fmt not in FORMATS:
        raise SystemExit(f"task file {path}: 'format' must be one of {', '.join(FORMATS)}, not {fmt!r}")
    if bool(spec.get("data")) == bool(spec.get("hf_id")):
        raise SystemExit(f"task file {path}: give one of 'data' (a file or folder) or 'hf_id' (a Hugging Face dataset)")
    fields = spec.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise SystemExit(f"task file {path}: 'fields' maps the loader's columns to this data's columns ({FORMATS[fmt][3]})")
    kind = FORMATS[fmt][1]
    template, metric = _TEMPLATE[kind]
    for key, want in (("template", template), ("metric", metric)):
        if spec.get(key) is not None and str(spec[key]) != want:
            raise SystemExit(f"task file {path}: format {fmt} is judged {template} and scored by {metric}; {key} {spec[key]!r} does not fit "
                             "(a format of another kind does)")  # fmt: skip
    group = spec.get("group") or ("VLM" if FORMATS[fmt][2] else "LLM")
    if group not in ("LLM", "VLM"):
        raise SystemExit(f"task file {path}: 'group' is LLM or VLM, not {group!r}")
    where = None
    if spec.get("data"):
        where = (path.parent / str(spec["data"])).resolve()
    return {"name": name, "format": fmt, "data": str(where) if where else None, "hf_id": spec.get("hf_id"), "config": spec.get("config"),
            "split": str(spec.get("split") or "test"), "fields": dict(fields), "group": group, "file": str(path)}  # fmt: skip


def register(spec: dict) -> str:
    """Add a task's benchmark to data.BENCHMARKS (again: the same spec is fine); returns its name."""
    name = spec["name"]
    known = data.canonical_name(name)
    if known is not None:
        old = BENCHMARKS[known]
        if getattr(old.rows, "spec", None) == spec:
            return known
        what = "a built-in benchmark" if old.rows is None else f"the task of {old.rows.spec['file']}"
        raise SystemExit(f"task file {spec['file']}: the name {name!r} is taken by {what}; choose another name")
    convert, kind, _, _ = FORMATS[spec["format"]]
    rows = _Rows(spec)
    BENCHMARKS[name] = Benchmark(name, spec["hf_id"] or "", spec["config"], spec["split"], kind, spec["group"] == "VLM",
                                 spec["data"] or "", convert, rows=rows)  # fmt: skip
    return name


class _Rows:
    """A task's rows: its file or dataset, columns renamed as its `fields` say, relative image paths made absolute."""

    def __init__(self, spec: dict):
        self.spec = spec

    def __call__(self, b: Benchmark):
        spec = self.spec
        if spec["data"]:
            where = Path(spec["data"])
            if not where.exists():
                raise DataError(f"benchmark {b.name!r}: no data at {where} (task file {spec['file']})")
            rows, file = _read(where), str(where)
            base = where if where.is_dir() else where.parent
        else:
            import datasets

            try:
                rows = data._encoded_images(datasets.load_dataset(spec["hf_id"], spec["config"], split=spec["split"]))
            except Exception as e:  # no network, no access: say where it was looked for
                raise DataError(f"benchmark {b.name!r}: the Hugging Face dataset {spec['hf_id']} could not be loaded "
                                f"({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}); task file {spec['file']}") from None  # fmt: skip
            file, base = f"{spec['hf_id']} ({spec['split']})", Path(spec["file"]).parent
        return (self._row(r, base) for r in rows), file

    def _row(self, row: dict, base: Path) -> dict:
        out = dict(row)
        for theirs_key, mine in self.spec["fields"].items():
            if mine in row:
                out[theirs_key] = row[mine]
        image = out.get("image")
        if isinstance(image, str) and not image.startswith(("http://", "https://")) and not Path(image).is_absolute():
            out["image"] = str(base / image)
        return out


def _read(where: Path):
    """Rows of a .jsonl / .json (a list) / .csv (with a header) file, or what data._rows reads (parquet, save_to_disk)."""
    if where.suffix == ".json":
        rows = json.loads(where.read_text(encoding="utf-8"))
        if not isinstance(rows, list):
            raise DataError(f"{where}: a .json task data file holds a list of rows")
        return rows
    if where.suffix == ".csv":
        with open(where, encoding="utf-8", newline="") as f:
            return list(csv.DictReader(f))
    rows, _ = data._rows(where)
    return rows


def load_tasks_dir(folder: str | Path) -> list[str]:
    """Register every task file in `folder`; their names."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise SystemExit(f"--tasks_dir {folder}: no such folder")
    files = sorted(f for f in folder.iterdir() if f.suffix in TASK_SUFFIXES)
    if not files:
        raise SystemExit(f"--tasks_dir {folder}: no task files (*.yaml, *.yml, *.json) there")
    return [register(read_task(f)) for f in files]


def resolve(spec: str) -> list[str]:
    """`--benchmarks` -> registered names: all / LLM / VLM (any case), names in any case, task files."""
    if spec.strip().casefold() in ("all", "llm", "vlm"):
        group = spec.strip().upper()
        return data.benchmark_names(None if group == "ALL" else group)
    names, unknown = [], []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item.endswith(TASK_SUFFIXES):
            names.append(register(read_task(item)))
        elif data.canonical_name(item):
            names.append(data.canonical_name(item))
        else:
            unknown.append(item)
    if unknown or not names:
        raise SystemExit(f"--benchmarks: unknown {', '.join(map(repr, unknown)) or 'empty list'}; known ({len(BENCHMARKS)}): "
                         f"{', '.join(BENCHMARKS)}; or all, LLM, VLM, a task file (*.yaml, *.json); --benchmarks list shows them")  # fmt: skip
    return list(dict.fromkeys(names))


def listing(data_root: str | None) -> str:
    """`--benchmarks list`: each benchmark's name, group, scoring and where its data is looked for."""
    rows = [("name", "group", "scoring", "data (local copy, else the Hugging Face hub)")]
    for name, b in BENCHMARKS.items():
        scoring = "rubric 0-5" if b.kind == "report" else "accuracy"
        if b.rows is not None:
            where = (b.rows.spec["data"] or f"hub {b.hf_id}") + f"  (task file {b.rows.spec['file']})"
        else:
            local = Path(data_root) / b.folder if data_root else Path("<data_root>") / b.folder
            found = " (found)" if data_root and local.is_dir() else ""
            where = f"{local}{found}, else hub {b.hf_id}" + (f" ({b.config})" if b.config else "")
        rows.append((name, b.group, f"{b.kind}: {scoring}", where))
    width = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = ["  ".join(r[i].ljust(width[i]) for i in range(3)) + "  " + r[3] for r in rows]
    return "\n".join(lines) + f"\n{len(BENCHMARKS)} benchmarks ({len(data.benchmark_names('LLM'))} LLM, {len(data.benchmark_names('VLM'))} VLM)"
