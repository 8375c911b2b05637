"""Extract the peers' own answer-checking test cases into benchmarks/data/peer_cases/*.jsonl.

    .venv/bin/python benchmarks/extract_peer_cases.py \\
        --math-verify <git dir of huggingface/Math-Verify> \\
        --lm-eval <git dir of EleutherAI/lm-evaluation-harness> \\
        --torchforge <git dir of meta-pytorch/torchforge>

Each git dir is a clone or a bare snapshot (``git --git-dir`` is used, no work tree needed);
the files are read at the pinned commits in :data:`PINS`, so the output is reproducible.
The peers' test code is never imported or executed: test cases are read with ``ast`` (literals
only) and YAML with ``yaml.safe_load``. ``benchmarks/checkers_vs_peers.py`` then runs offline
from the written files.

Conversion (the rules of issue 15):

* Math-Verify gold: unwrapped to bare LaTeX as MATH stores its golds: with one ``\\boxed``, its
  content (MATH's own rule); otherwise what math-verify's LaTeX extraction reads
  (``parse(gold, [LatexExtractionConfig])``, never its ``ExprExtractionConfig``, which calls
  ``parse_expr``), since the test expectations are about that reading (``\\boxed{1} papers and
  \\boxed{2} bins`` is the set ``1,2``); where that reads nothing whole, the gold without its
  math delimiters.
* Math-Verify prediction: "boxed" when it has a ``\\boxed``/``\\fbox`` (kept as written);
  "prose" when, outside math delimiters and ``\\text{}``, it has a word of 3+ letters that is not
  a percent word (a sentence, as a model writes it; kept as written); otherwise "bare", wrapped as ``\\boxed{...}`` (a prediction that is one math
  span loses its ``$``/``\\(``/``\\[`` delimiters first).
* Cases run with settings other than math-verify's defaults that our checker uses
  (``strict=False``, ``allow_set_relation_comp=True``, ``float_rounding`` other than 6) are kept
  and marked ``setting`` so the benchmark lists them apart.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "data" / "peer_cases"

PINS = {
    "math_verify": {"repo": "huggingface/Math-Verify",
                    "commit": "5d148cfaaf99214c2e4ffb4bc497ab042c592a7a",
                    "license": "Apache-2.0 (file LICENCE)",
                    "files": ["tests/test_all.py", "tests/test_numina_cases.py",
                              "tests/test_open_thoughts.py", "tests/test_yujianll.py",
                              "tests/test_boxed.py", "tests/test_strict.py"]},
    "lm_eval": {"repo": "EleutherAI/lm-evaluation-harness",
                "commit": "4e7e0d47f33bc71070c1d38394bafbb52b117163",
                "license": "MIT (file LICENSE.md)",
                "files": ["lm_eval/tasks/gsm8k/gsm8k-cot.yaml",
                          "lm_eval/tasks/gsm8k/gsm8k-cot-llama.yaml"]},
    "torchforge": {"repo": "meta-pytorch/torchforge",
                   "commit": "6c40c331f40f97610fcfd2b1b847766c07c3e7ad",
                   "license": "BSD-3-Clause (file LICENSE; the test file's header says MIT)",
                   "files": ["tests/unit_tests/rl/environments/test_gsm8k.py"]},
}
DEFAULTS = {"match_types": ["latex", "expr"], "precision": 6, "strict": True,
            "allow_set_relation_comp": False}


def git_show(git_dir: str, commit: str, path: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "show", f"{commit}:{path}"],
                          check=True, capture_output=True, text=True).stdout


def resolve(git_dir: str, commit: str) -> str:
    return subprocess.run(["git", "--git-dir", git_dir, "rev-parse", commit],
                          check=True, capture_output=True, text=True).stdout.strip()


# ------------------------------------------------------------------ Math-Verify


def _literal(node: ast.AST):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None  # an f-string or a call: not a literal test case


def _call_settings(func: ast.FunctionDef) -> dict:
    """Keyword settings of the compare_strings/verify call in a test body: constants, or the
    name of a parametrize argument that supplies them."""
    settings: dict = {}
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("compare_strings", "verify"):
            for kw in node.keywords:
                key = {"float_rounding": "precision"}.get(kw.arg, kw.arg)
                settings[key] = kw.value.id if isinstance(kw.value, ast.Name) else _literal(kw.value)
    return settings


def math_verify_cases(source: str, file: str) -> list[dict]:
    cases = []
    for func in ast.walk(ast.parse(source)):
        if not isinstance(func, ast.FunctionDef):
            continue
        for deco in func.decorator_list:
            if not (isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "parametrize"):
                continue
            names = [n.strip() for n in _literal(deco.args[0]).split(",")]
            settings = _call_settings(func)
            for index, row in enumerate(deco.args[1].elts):
                values = [_literal(v) for v in row.elts]
                if any(v is None for v in values):
                    cases.append({"source": file, "test": func.name, "index": index,
                                  "skipped": "not a literal (f-string)"})
                    continue
                args = dict(zip(names, values))
                case = {k: (args[v] if isinstance(v, str) and v in args else v)
                        for k, v in {**DEFAULTS, **settings}.items()}
                cases.append({"source": file, "test": func.name, "index": index,
                              "gold_raw": args["gold"], "pred_raw": args["pred"],
                              "expected": int(args.get("expected", args.get("result"))),
                              **{k: case[k] for k in DEFAULTS}})
    return cases


_DELIMS = re.compile(r"\$\$|(?<!\\)\$|\\\(|\\\)|\\\[|\\\]")
_ONE_SPAN = re.compile(r"\s*(\$\$|\$|\\\(|\\\[)(.*?)(\$\$|\$|\\\)|\\\])\s*", re.DOTALL)
_CLOSE = {"$$": "$$", "$": "$", "\\(": "\\)", "\\[": "\\]"}


_WORD = re.compile(r"(?<![\\a-zA-Z])[a-zA-Z]{3,}")
_PERCENT_WORDS = {"percent", "percentage", "pct"}


def _outside_math(text: str) -> str:
    """``text`` without its ``$...$``, ``\\(...\\)``, ``\\[...\\]`` spans and ``\\text{...}``."""
    text = re.sub(r"\$\$.*?\$\$|(?<!\\)\$.*?(?<!\\)\$|\\\(.*?\\\)|\\\[.*?\\\]", " ", text, flags=re.DOTALL)
    return re.sub(r"\\(?:text|mbox|textbf|mathrm)\{[^{}]*\}", " ", text)


def pred_form(pred: str) -> str:
    """"boxed", "prose" (words outside math: a sentence, as a model writes) or "bare"."""
    if "\\boxed" in pred or "\\fbox" in pred:
        return "boxed"
    words = [w for w in _WORD.findall(_outside_math(pred)) if w.lower() not in _PERCENT_WORDS]
    return "prose" if words else "bare"


def wrap_bare(pred: str) -> str:
    """``\\boxed{...}`` around a bare prediction; one enclosing math span loses its delimiters."""
    m = _ONE_SPAN.fullmatch(pred)
    if m and _CLOSE[m.group(1)] == m.group(3) and "$" not in m.group(2):
        pred = m.group(2)
    return "\\boxed{" + pred.strip() + "}"


def _balanced(text: str) -> bool:
    depth = 0
    for ch in re.sub(r"\\[{}]", "", text):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth < 0:
            return False
    return depth == 0


def bare_gold(gold: str) -> str:
    """MATH's reading where the gold has one box (its content), else math-verify's reading
    (several boxes joined), else the gold without its math delimiters."""
    from math_verify import LatexExtractionConfig, parse

    from irpo.tasks.math import last_boxed

    if len(re.findall(r"\\boxed\s*\{", gold)) == 1 and last_boxed(gold):
        return last_boxed(gold).strip()
    found = parse(gold, [LatexExtractionConfig(boxed_match_priority=0)])
    if found and _balanced(found[-1]):
        return found[-1]
    return _DELIMS.sub("", gold).strip()


def convert(case: dict) -> dict:
    if "skipped" in case:
        return case
    form = pred_form(case["pred_raw"])
    response = case["pred_raw"]
    if form == "bare":
        response = wrap_bare(response)
    off = [k for k in ("precision", "strict", "allow_set_relation_comp") if case[k] != DEFAULTS[k]]
    return {**case, "gold": bare_gold(case["gold_raw"]), "response": response, "form": form,
            "setting": ", ".join(f"{k}={case[k]}" for k in off) or None}


# ----------------------------------------------------------------- GSM8K peers


def lm_eval_cases(text: str, file: str) -> list[dict]:
    """Each few-shot target of an lm-eval GSM8K CoT task, with the number its own strict-match
    filter reads from it as the gold (lm-eval grades its exemplars this way)."""
    cfg = yaml.safe_load(text)
    strict = next(f for f in cfg["filter_list"] if f["name"] == "strict-match")
    pattern = re.compile(strict["filter"][0]["regex_pattern"])
    cases = []
    for index, shot in enumerate(cfg["fewshot_config"]["samples"]):
        m = pattern.search(shot["target"])
        gold = next(g for g in m.groups() if g).strip().rstrip(".")
        cases.append({"source": file, "test": "fewshot_config.samples", "index": index,
                      "response": shot["target"], "gold": gold, "expected": 1,
                      "rule": f"strict-match {strict['filter'][0]['regex_pattern']!r}"})
    return cases


def _string_assigns(func: ast.FunctionDef):
    """(text, call kwargs, expected) for each ``text = ...; answer = extract(text, ...);
    assert answer == X`` sequence in a torchforge test function."""
    text = kwargs = None
    for stmt in func.body:
        if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
            text = stmt.value.value
        elif isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Call):
            kwargs = {kw.arg: _literal(kw.value) for kw in stmt.value.keywords}
        elif isinstance(stmt, ast.Assert) and isinstance(stmt.test, ast.Compare) and text is not None:
            right = stmt.test.comparators[0]
            expected = None if isinstance(stmt.test.ops[0], ast.Is) else _literal(right)
            yield text, kwargs or {}, expected


def torchforge_cases(source: str, file: str) -> list[dict]:
    cases = []
    tree = ast.parse(source)
    for cls in tree.body:
        if not (isinstance(cls, ast.ClassDef) and cls.name == "TestExtractGSM8KAnswer"):
            continue
        for func in cls.body:
            if not isinstance(func, ast.FunctionDef):
                continue
            for index, (text, kwargs, expected) in enumerate(_string_assigns(func)):
                method = kwargs.get("method", "flexible")
                case = {"source": file, "test": func.name, "index": index, "response": text,
                        "method": method, "peer_answer": expected}
                if expected is None:  # the peer finds no answer: any gold must be rejected
                    case.update(gold="0", expected=0, gold_note="no answer expected")
                else:
                    case.update(gold=repr(expected).removesuffix(".0"), expected=1)
                case["setting"] = "method=strict" if method == "strict" else None
                cases.append(case)
    return cases


def write(name: str, pin: dict, cases: list[dict]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    header = {"_source": pin["repo"], "_commit": pin["commit"], "_license": pin["license"],
              "_files": pin["files"], "_extracted_by": "benchmarks/extract_peer_cases.py"}
    with open(OUT / f"{name}.jsonl", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(header) + "\n")
        fh.writelines(json.dumps(case, ensure_ascii=False) + "\n" for case in cases)
    print(f"{OUT / name}.jsonl: {len(cases)} cases")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--math-verify", required=True)
    p.add_argument("--lm-eval", required=True)
    p.add_argument("--torchforge", required=True)
    args = p.parse_args()
    for name, git_dir in (("math_verify", args.math_verify), ("lm_eval", args.lm_eval),
                          ("torchforge", args.torchforge)):
        PINS[name]["commit"] = resolve(git_dir, PINS[name]["commit"])
    pin = PINS["math_verify"]
    mv = [convert(c) for f in pin["files"]
          for c in math_verify_cases(git_show(args.math_verify, pin["commit"], f), f)]
    write("math_verify", pin, mv)
    gsm = []
    for name, reader in (("lm_eval", lm_eval_cases), ("torchforge", torchforge_cases)):
        pin = PINS[name]
        cases = [c for f in pin["files"] for c in reader(git_show(getattr(args, name), pin["commit"], f), f)]
        gsm += [{"peer": pin["repo"], "commit": pin["commit"], **c} for c in cases]
    pins = {k: PINS[k] for k in ("lm_eval", "torchforge")}
    write("gsm8k_peers", {"repo": " + ".join(p["repo"] for p in pins.values()),
                          "commit": " + ".join(p["commit"] for p in pins.values()),
                          "license": " + ".join(p["license"] for p in pins.values()),
                          "files": [f for p in pins.values() for f in p["files"]]}, gsm)


if __name__ == "__main__":
    main()
