"""Code versions from import closures (#16 item 1): a change in a library module reruns exactly the rules whose
scripts import it (directly or not) and what depends on them.

The rerun test works on a copy of the workflow: every output of a tiny config is created empty and recorded as
done with ``snakemake --touch`` (Snakemake then holds each job's params, the code versions among them), so that a
dry run after changing one module lists what that change reruns, without computing anything.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline_utils import PACS_ROOT, REPO, dry_run_jobs, output_tail, run_snakemake, tiny_config, write_config

from robustft.code_closure import CodeClosure

SCRIPTS = REPO / "workflow_scripts"
#: Rules whose outputs do not depend on library code: rule fetch_pacs downloads a pinned commit.
NO_CODE_VERSION = {"fetch_pacs"}


def _rule_blocks(rules_dir: Path) -> dict[str, str]:
    """rule name -> the text of its definition, from rules/*.smk."""
    blocks = {}
    for path in sorted(rules_dir.glob("*.smk")):
        for match in re.finditer(r"^rule (\w+):\n((?:[ \t]+.*\n|\n)*)", path.read_text(), re.M):
            blocks[match[1]] = match[2]
    return blocks


def _rule_scripts(rules_dir: Path) -> dict[str, str]:
    return {rule: re.search(r'script:\s*"\.\./workflow_scripts/(\w+\.py)"', text)[1]
            for rule, text in _rule_blocks(rules_dir).items() if "script:" in text}


# --------------------------------------------------------------------------------------------------- the closure


def test_every_rule_versions_the_script_it_runs():
    for rule, text in _rule_blocks(REPO / "rules").items():
        script = re.search(r'script:\s*"\.\./workflow_scripts/(\w+\.py)"', text)
        assert script, f"rule {rule} runs no workflow script"
        code = re.search(r'code=code_version\("([^"]+)"\)', text)
        if rule in NO_CODE_VERSION:
            assert code is None, rule
        else:
            assert code and code[1] == script[1], f"rule {rule} runs {script[1]} but versions {code and code[1]}"


def _package(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_closure_follows_imports_registries_and_packages(tmp_path):
    root = _package(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "import os\nfrom pkg.sub import b\n",
        "pkg/sub/__init__.py": "from .c import thing\n",
        "pkg/sub/b.py": "def f():\n    import pkg.lazy\n",
        "pkg/sub/c.py": "REGISTRY = {'x': 'pkg.registered:Klass'}\nthing = __import__('pkg.dunder')\n",
        "pkg/sub/data.json": "{}",
        "pkg/lazy.py": "from . import leaf\n",
        "pkg/leaf.py": "",
        "pkg/registered.py": "",
        "pkg/dunder.py": "",
        "pkg/unused.py": "import pkg.a\n",
        "script.py": "from pkg.a import nothing_named_a_module\n",
    })
    closure = CodeClosure(root, package="pkg")
    got = {str(p.relative_to(root)) for p in closure.closure(root / "script.py")}
    assert got == {"pkg/__init__.py", "pkg/a.py", "pkg/sub/__init__.py", "pkg/sub/b.py", "pkg/sub/c.py",
                   "pkg/sub/data.json", "pkg/lazy.py", "pkg/leaf.py", "pkg/registered.py", "pkg/dunder.py"}
    before = closure.version(root / "script.py")
    (root / "pkg" / "unused.py").write_text("import pkg.a  # changed\n")
    assert CodeClosure(root, package="pkg").version(root / "script.py") == before
    (root / "pkg" / "leaf.py").write_text("X = 1\n")
    assert CodeClosure(root, package="pkg").version(root / "script.py") != before


def test_the_cache_parses_only_changed_files(tmp_path, monkeypatch):
    root = _package(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "import pkg.b\n", "pkg/b.py": "",
                               "script.py": "import pkg.a\n"})
    cache = tmp_path / "cache" / "closure.json"
    first = CodeClosure(root, package="pkg", cache=cache)
    version = first.version(root / "script.py")
    first.save_cache()
    parsed = []
    original = CodeClosure._parse
    monkeypatch.setattr(CodeClosure, "_parse", lambda self, path: parsed.append(path.name) or original(self, path))
    again = CodeClosure(root, package="pkg", cache=cache)
    assert again.version(root / "script.py") == version and parsed == []
    (root / "pkg" / "b.py").write_text("import pkg.c\n")
    (root / "pkg" / "c.py").write_text("")
    changed = CodeClosure(root, package="pkg", cache=cache)
    assert changed.version(root / "script.py") != version
    assert sorted(parsed) == ["b.py", "c.py"]  # a.py, the script and __init__.py come from the cache


def test_known_facts_of_the_real_closures():
    """Hand-checked: what each script must (and must not) depend on, including the modules the hand-written
    lists of before missed (issue #16: pipeline/runs.py, pipeline/stages.py)."""
    closure = CodeClosure(REPO)

    def files(script: str) -> set[str]:
        return {str(p.relative_to(REPO)) for p in closure.closure(SCRIPTS / script)}

    assert {"robustft/pipeline/runs.py", "robustft/training/trainer.py", "robustft/methods/lora.py",
            "robustft/backbones/open_clip_backbone.py"} <= files("finetune.py")
    assert {"robustft/pipeline/stages.py", "robustft/backbones/efficientnet.py",
            "robustft/backbones/open_clip_backbone.py", "robustft/features.py"} <= files("features.py")
    assert {"robustft/data/imagenet.py", "robustft/data/domainnet.py",
            "robustft/data/classlists/imagenet_wnids.json"} <= files("build_manifest.py")
    assert "robustft/training/trainer.py" not in files("features.py")
    assert not {f for f in files("report.py") if f.startswith(("robustft/training", "robustft/methods"))}
    assert files("combine_summaries.py") >= {"robustft/pipeline/studies.py", "robustft/io/tables.py"}


@pytest.mark.parametrize("script", ["features.py", "finetune.py", "sweep.py", "summary.py", "report.py",
                                    "fetch_weights.py"])
def test_the_static_closure_holds_every_module_the_script_imports(script):
    """Run the script's import statements in a fresh interpreter: every robustft module then loaded is in the
    closure found by reading the sources."""
    tree = __import__("ast").parse((SCRIPTS / script).read_text())
    imports = "\n".join(__import__("ast").unparse(node) for node in tree.body
                        if type(node).__name__ in ("Import", "ImportFrom"))
    code = f"import sys\n{imports}\nprint('\\n'.join(m for m in sys.modules if m.split('.')[0] == 'robustft'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = {CodeClosure(REPO).module_file(name) for name in proc.stdout.split()}
    static = set(CodeClosure(REPO).closure(SCRIPTS / script))
    assert loaded and None not in loaded and loaded <= static, sorted(map(str, loaded - static))


# ------------------------------------------------------------------------------------------- reruns, every rule

WORKFLOW_PARTS = ("Snakefile", "rules", "workflow_scripts", "robustft", "config", "config.yaml", "envs", "profiles",
                  "report")


def _dry_run(workdir: Path, snakefile: Path, *args: str):
    proc = run_snakemake(workdir, "-n", *args, snakefile=snakefile, timeout=300)
    assert proc.returncode == 0, output_tail(proc)
    return proc


@pytest.fixture(scope="module")
def touched(tmp_path_factory):
    """A copy of the workflow and a working directory where every job of a tiny config is recorded as done."""
    if not PACS_ROOT.is_dir():
        pytest.skip(f"PACS not found at {PACS_ROOT}")
    repo = tmp_path_factory.mktemp("repo")
    for part in WORKFLOW_PARTS:
        source = REPO / part
        if source.is_dir():
            shutil.copytree(source, repo / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, repo / part)
    workdir = tmp_path_factory.mktemp("work")
    config = tiny_config({"dataset": {"ood_domains": ["sketch"]}, "sweep": {"alphas": [0.0, 1.0]},
                          "calibration": {"pcv_folds": 1}})
    config["methods"] = {"zeroshot": {"default": {}}, "full_ft": {"default": {}, "absent2": {
        "protocol": {"kind": "class_subset", "absent_classes": ["giraffe", "house"]}}}}
    write_config(workdir, config)
    snakefile = repo / "Snakefile"
    plan = _dry_run(workdir, snakefile, "--forceall")
    all_jobs = dry_run_jobs(plan)
    outputs = {f.strip() for line in (plan.stdout + plan.stderr).splitlines() if line.strip().startswith("output:")
               for f in line.split("output:", 1)[1].split(",")}
    for name in outputs:
        (workdir / name).parent.mkdir(parents=True, exist_ok=True)
        (workdir / name).touch()
    proc = run_snakemake(workdir, "--touch", "--forceall", snakefile=snakefile, timeout=600)
    assert proc.returncode == 0, output_tail(proc)
    assert "Nothing to be done" in output_tail(_dry_run(workdir, snakefile))
    rulegraph = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(snakefile), "--directory", str(workdir),
         "--rulegraph", "--cores", "1"], capture_output=True, text=True, timeout=300)
    names = dict(re.findall(r"^\s*(\d+)\[label = \"(\w+)\"", rulegraph.stdout, re.M))
    edges = {(names[a], names[b]) for a, b in re.findall(r"^\s*(\d+) -> (\d+)", rulegraph.stdout, re.M)}
    return {"repo": repo, "workdir": workdir, "snakefile": snakefile, "jobs": all_jobs, "edges": edges}


def _downstream(rules: set[str], edges: set[tuple[str, str]], ancient: set[tuple[str, str]]) -> set[str]:
    found, todo = set(rules), list(rules)
    while todo:
        rule = todo.pop()
        for a, b in edges - ancient:
            if a == rule and b not in found:
                found.add(b)
                todo.append(b)
    return found


def _modules_to_touch(closures: dict[str, set[Path]], upstream: dict[str, set[str]], modules: list[Path]) -> list[Path]:
    """For every rule: the module of its closure in the fewest closures, and one outside its closure and those of
    the rules it depends on (when there is one)."""
    chosen = []
    for rule, closure in closures.items():
        inside = sorted(closure & set(modules), key=lambda m: (sum(m in c for c in closures.values()), str(m)))
        chosen.append(inside[0])
        above = set().union(*(closures[r] for r in upstream[rule] | {rule}))
        outside = [m for m in modules if m not in above]
        if outside:
            chosen.append(outside[0])
    return sorted(set(chosen))


@pytest.mark.pipeline
def test_changing_a_module_reruns_the_rules_whose_scripts_import_it_and_only_those(touched):
    repo, workdir, snakefile = touched["repo"], touched["workdir"], touched["snakefile"]
    scripts = {rule: script for rule, script in _rule_scripts(repo / "rules").items()
               if rule in touched["jobs"] and rule not in NO_CODE_VERSION}
    ancient = {(m[1], rule) for rule, text in _rule_blocks(repo / "rules").items()
               for m in re.finditer(r"ancient\(rules\.(\w+)\.", text)}
    edges = touched["edges"]
    closure = CodeClosure(repo)
    closures = {rule: set(closure.closure(repo / "workflow_scripts" / s)) for rule, s in scripts.items()}
    upstream = {rule: {r for r in scripts if rule in _downstream({r}, edges, ancient) and r != rule} for rule in scripts}
    modules = sorted((repo / "robustft").rglob("*.py"))
    checked = {}
    for module in _modules_to_touch(closures, upstream, modules) + [repo / "robustft" / "pipeline" / "runs.py"]:
        text = module.read_text()
        module.write_text(text + "\n# changed by the test\n")
        try:
            jobs = dry_run_jobs(_dry_run(workdir, snakefile, "--quiet", "rules"))
        finally:
            module.write_text(text)
        direct = {rule for rule, files in closures.items() if module in files}
        expected = _downstream(direct, edges, ancient) & set(touched["jobs"])
        name = str(module.relative_to(repo))
        assert set(jobs) == expected, f"{name}: reran {sorted(jobs)}, expected {sorted(expected)}"
        for rule in expected:  # every job of the rule, not some
            assert jobs[rule] == touched["jobs"][rule], f"{name}: {rule} {jobs[rule]} of {touched['jobs'][rule]}"
        checked[name] = sorted(direct)
    assert set().union(*map(set, checked.values())) == set(scripts), (checked, sorted(scripts))
    assert {"finetune", "finetune_pcv"} <= set(checked["robustft/pipeline/runs.py"])
    assert "Nothing to be done" in output_tail(_dry_run(workdir, snakefile))
