"""README.md holds: every command in it is run here or by `python -m bench.readme_check` (which compares the
long ones' output with the README's), the output it shows comes back, its links point at files and headings
that exist, and its configuration table is conf/'s."""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"


@pytest.fixture(scope="module")
def check():
    sys.path.insert(0, str(REPO))
    try:
        yield importlib.import_module("bench.readme_check")
    finally:
        sys.path.remove(str(REPO))


@pytest.fixture(scope="module")
def text() -> str:
    return README.read_text()


def make_targets() -> dict[str, list[str]]:
    """Makefile target -> its recipe lines."""
    targets: dict[str, list[str]] = {}
    current = None
    for line in (REPO / "Makefile").read_text().splitlines():
        match = re.match(r"^([\w-]+):", line)
        if match:
            current = targets.setdefault(match.group(1), [])
        elif line.startswith("\t") and current is not None:
            current.append(line.strip())
    return targets


def run_shell_command(command: str, workdir: Path) -> None:
    """awk, mkdir and cp lines of the README, run by bash on fixture files made for them."""
    subprocess.run(["bash", "-c", command], cwd=workdir, check=True)


def shell_fixture(workdir: Path) -> None:
    """What the README's shell lines read: a balanced segment list (3 header lines, 30 rows) and the two
    teacher runs' averaged checkpoints."""
    rows = [f'Y{i:010d}, 0.000, 10.000, "/m/0{i % 7}"' for i in range(30)]
    header = [
        "# Segments csv created Sun Mar  5 10:54:31 2017",
        "# num_ytids=30",
        "# YTID, start, end, labels",
    ]
    (workdir / "balanced_train_segments.csv").write_text("\n".join(header + rows) + "\n")
    for name in ("teacher_ced", "teacher_cnn"):
        folder = workdir / "mine" / "runs" / name / "checkpoints"
        folder.mkdir(parents=True)
        (folder / "averaged.ckpt").write_text(name)


def test_every_command_is_run_here_or_by_the_readme_check(check, text, tmp_path):
    """Each command is composed (Hydra: its overrides are valid for that command), parsed (ced-predict),
    run (shell lines, on fixtures), or found in the Makefile; a command this test cannot run whole must be in
    bench.readme_check.EXPENSIVE, and every entry there must still be in the README."""
    from ced_lightning import compose_config
    from ced_lightning.cli import predict_parser
    from ced_lightning.engines.inputs import check_train_config

    commands = check.readme_commands(text)
    assert len(commands) > 20, commands
    shell_fixture(tmp_path)
    targets = make_targets()
    run_whole = set()
    for command in commands:
        # `<run>` stands for what the user fills in (a run folder's name)
        hydra = check.hydra_command(re.sub(r"<(\w+)>", r"\1", command))
        words = command.split()
        if hydra:
            name, overrides = hydra
            assert (REPO / "src" / "ced_lightning" / f"{name}.py").is_file(), command
            cfg = compose_config(overrides, config=name)
            if name == "train":
                check_train_config(cfg)
        elif words[0] == "ced-predict":
            predict_parser().parse_args(words[1:])
        elif words[0] == "make":
            assert words[1] in targets, f"{command}: no such Makefile target"
        elif words[0] in ("awk", "mkdir", "cp"):
            run_shell_command(command, tmp_path)
            run_whole.add(command)
        else:
            pytest.fail(f"README command of an unknown kind: {command}")
    unchecked = [
        c for c in commands if c not in run_whole and c not in check.EXPENSIVE and not check.hydra_command(c)
    ]
    assert not unchecked, f"commands neither run here nor listed in bench.readme_check.EXPENSIVE: {unchecked}"
    assert not set(check.EXPENSIVE) - set(commands), "EXPENSIVE lists commands the README no longer has"
    # the shell lines did what the README says: a tenth of the rows held out, the header kept in both
    val = (tmp_path / "val_segments.csv").read_text().splitlines()
    rest = (tmp_path / "balanced_rest_segments.csv").read_text().splitlines()
    assert len(val) == 3 + 3 and len(rest) == 3 + 27 and val[:3] == rest[:3]
    assert (tmp_path / "mine" / "teachers" / "mobilenet.ckpt").read_text() == "teacher_cnn"


def test_make_demo_is_the_command_the_readme_names(text):
    (recipe,) = make_targets()["demo"]
    assert recipe.endswith("python -m ced_lightning.train experiment=student_demo")
    assert "make demo" in text and "= python -m ced_lightning.train experiment=student_demo" in text


def test_shown_output_comes_back(check, text, tmp_path, monkeypatch, capsys):
    """The ```console examples: run as shown (the random-weight stand-in of a released model on a demo clip);
    the same classes, probabilities within 2e-3 (float32 kernels differ between CPUs)."""
    from ced_lightning.cli import predict_main

    examples = check.console_examples(text)
    assert examples
    shutil.copy(
        REPO / "tests" / "data" / "ced_reference" / "ced_tiny_depth2_random.pt",
        tmp_path / "ced_tiny_random.pt",
    )
    check.prepare_inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    for command, shown in examples:
        words = command.split()
        assert words[0] == "ced-predict", f"no runner for the README example {command}"
        capsys.readouterr()
        assert predict_main(words[1:]) == 0
        printed = capsys.readouterr().out.splitlines()
        assert len(printed) == len(shown), (printed, shown)
        for got, want in zip(printed, shown, strict=True):
            got_file, got_tags = parse_tags(got)
            want_file, want_tags = parse_tags(want)
            assert got_file == want_file
            assert [n for n, _ in got_tags] == [n for n, _ in want_tags], (got, want)
            assert all(abs(g - w) <= 2e-3 for (_, g), (_, w) in zip(got_tags, want_tags, strict=True)), (
                got,
                want,
            )


def parse_tags(line: str) -> tuple[str, list[tuple[str, float]]]:
    name, tags = line.split(": ", 1)
    pairs = [tag.rsplit(" ", 1) for tag in tags.split(", ")]
    return name, [(label, float(value)) for label, value in pairs]


def github_anchor(heading: str) -> str:
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_relative_links_point_at_files_and_headings(text):
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    relative = [link for link in links if not re.match(r"\w+://", link)]
    assert len(relative) > 10
    for link in relative:
        path, _, anchor = link.partition("#")
        target = (README.parent / path) if path else README
        assert target.exists(), f"README links to {link}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", target.read_text(), re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"README links to {link}: no such heading"


def test_configuration_table_is_conf():
    """Every group folder of conf/ with every option, the defaults of conf/train.yaml marked."""
    import yaml

    section = README.read_text().split("## Configuration", 1)[1].split("\n## ", 1)[0]
    listed: dict[str, set[str]] = {}
    defaults: dict[str, str] = {}
    for groups, options in re.findall(r"^\| ((?:`[\w_]+`,? ?)+) \| (.+) \|$", section, re.M):
        names = set(re.findall(r"`(\w+)`", options))
        for group in re.findall(r"`(\w+)`", groups):
            listed[group] = names
            marked = re.search(r"`(\w+)` \(default", options)
            if marked:
                defaults[group] = marked.group(1)
    conf = REPO / "conf"
    folders = {p.name: {f.stem for f in p.glob("*.yaml")} for p in conf.iterdir() if p.is_dir()}
    assert listed == folders
    train_defaults = {}
    for entry in yaml.safe_load((conf / "train.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            train_defaults.update({k: v for k, v in entry.items() if v is not None})
    for group, option in defaults.items():
        assert train_defaults.get(group) == option, f"README marks {group}={option} as the default"


def test_the_readme_is_a_front_door(text):
    lines = text.splitlines()
    assert len(lines) <= 250
    assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "a date in the README"
    assert not re.search(r"\bissue \d+", text, re.I), "an issue number in the README"
    assert not re.search(r"\btest_\w+\.py|::test_", text), "test names belong in docs/reliability.md"


def test_readme_check_compares_tables_within_its_tolerance(check):
    shown = check.table_rows(
        ["| row | test mAP |", "| --- | --- |", "| student | 0.6034 |", "| teacher | 0.6585 |"]
    )
    measured = check.table_rows(
        [
            "┃              ┃    val ┃   test ┃",
            "│ student      │ 0.5900 │ 0.6100 │",
            "│ teacher      │ 0.6400 │ 0.7000 │",
            "└──────────────┴────────┴────────┘",
            "│ after        │ 0.1    │ 0.2    │",
        ]
    )
    assert measured == {"student": ["0.5900", "0.6100"], "teacher": ["0.6400", "0.7000"]}
    problems = check.compare_tables(shown, measured, tolerance=0.02)
    assert len(problems) == 1 and "teacher" in problems[0] and "0.7000" in problems[0]
    assert "not in the output" in check.compare_tables({"label-only": ["0.59"]}, measured, 0.02)[0]


def test_bench_readme_writes_its_tables_under_bench(tmp_path, monkeypatch):
    """`python -m bench.readme` fills bench/performance.md's markers, never README.md."""
    monkeypatch.syspath_prepend(str(REPO))
    readme_module = importlib.import_module("bench.readme")
    assert readme_module.PAGE == REPO / "bench" / "performance.md"
    assert readme_module.START in readme_module.PAGE.read_text()
    assert readme_module.START not in README.read_text()
    page = tmp_path / "performance.md"
    page.write_text(f"intro\n{readme_module.START}\nold\n{readme_module.END}\nafter\n")
    machine = {"cpu": "CPU", "cores": 2, "gpu": None, "date": "2000-01-01T00:00:00"}
    results = {
        "machine": machine,
        "sections": {"storage": {"ratios": {"int8 on disk / paper's layout on disk": 0.5}}},
    }
    readme_module.write_table(results, page)
    written = page.read_text()
    assert written.startswith("intro\n") and written.endswith("after\n") and "old" not in written
    assert "| storage | int8 on disk / paper's layout on disk | 0.5 |" in written


def test_the_python_session_is_the_one_the_docs_run(text):
    """The README's Python lines (calls and their output) are lines of docs/using_models.md's session, which
    tests/test_api.py runs by doctest: an API change that breaks the README breaks that test."""
    block = re.search(r"```python\n(>>> .*?)```", text, flags=re.S)
    assert block, "README.md shows no Python session"
    docs = (REPO / "docs" / "using_models.md").read_text()
    start = docs.index(">>> import ced_lightning as ced")
    session = docs[start : docs.index("```", start)].splitlines()
    shown = [line for line in block.group(1).splitlines() if line.strip()]
    missing = [line for line in shown if line not in session]
    assert not missing, f"README lines not in docs/using_models.md's doctested session: {missing}"
