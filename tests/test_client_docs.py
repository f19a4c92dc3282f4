"""Every example in docs/client.md runs as written, against a real three-region mesh
like ``make run``'s (the example rules, ports 8081–8083 mapped to the test's own
free ports): each ``python`` block as a script, each ``sh`` line as a command. The
README's "Calling bucketmesh from Python" section is the marked part of that page;
once the README carries it, the two must not drift apart.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import Mesh, ServerFactory

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "client.md"
README = ROOT / "README.md"
EXAMPLE_BUCKETS = ROOT / "src" / "bucketmesh" / "examples" / "buckets.yaml"
MAKE_RUN_PORTS = (8081, 8082, 8083)  # us-east-1, eu-central-1, ap-southeast-2
BLOCK = re.compile(r"^```(python|sh)\n(.*?)^```$", re.M | re.S)
README_PART = re.compile(r"<!-- readme:start -->\n(.*?)<!-- readme:end -->", re.S)


#: The first line of an example that is a file of the test suite, run by its own test
#: (tests/test_embed.py serves tests/embed_app.py with uvicorn --workers 4).
SERVED_ELSEWHERE = "# app.py: uvicorn --workers 4 app:app (tests/embed_app.py"


def blocks(language: str) -> list[str]:
    return [
        code
        for lang, code in BLOCK.findall(DOC.read_text())
        if lang == language and not code.startswith(SERVED_ELSEWHERE)
    ]


def test_the_embedded_example_is_the_served_app() -> None:
    served = (ROOT / "tests" / "embed_app.py").read_text()
    examples = [c for _, c in BLOCK.findall(DOC.read_text()) if c.startswith(SERVED_ELSEWHERE)]
    assert len(examples) == 1
    code = examples[0].split("\n", 1)[1]
    assert code.strip() in served


def test_the_page_has_examples_to_run() -> None:
    assert len(blocks("python")) >= 4 and blocks("sh")


def test_the_readme_section_matches_the_page() -> None:
    part = README_PART.search(DOC.read_text())
    assert part is not None, "docs/client.md lost its readme markers"
    section = part.group(1)
    assert section.startswith("## Calling bucketmesh from Python\n")
    readme = README.read_text()
    assert section.strip() in readme


def test_every_example_runs_against_a_mesh(serve: ServerFactory) -> None:
    buckets = yaml.safe_load(EXAMPLE_BUCKETS.read_text())
    mesh = Mesh(serve, ["us-east-1", "eu-central-1", "ap-southeast-2"], buckets=buckets).start()
    ports = dict(zip(MAKE_RUN_PORTS, (node.port for node in mesh), strict=True))

    def local(code: str) -> str:
        return re.sub(r"127\.0\.0\.1:(808[123])\b", lambda m: f"127.0.0.1:{ports[int(m[1])]}", code)

    env = {k: v for k, v in os.environ.items() if not k.startswith("BUCKETMESH_")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    outputs = []
    for number, code in enumerate(blocks("python"), 1):
        done = subprocess.run(
            [sys.executable, "-c", local(code)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            check=False,
        )
        assert done.returncode == 0, f"python example {number}:\n{code}\n{done.stderr}"
        outputs.append(done.stdout)
    assert outputs[0].split()[:3] == ["True", "4999", "us-east-1"], outputs[0]
    assert "100 allowed" in outputs[3] and "doing the work" in outputs[3], outputs[3]
    for code in blocks("sh"):
        for line in filter(None, code.splitlines()):
            done = subprocess.run(
                ["bash", "-c", local(line)],
                capture_output=True,
                text=True,
                timeout=120,
                env=env,
                check=False,
            )
            assert done.returncode == 0, f"$ {line}\n{done.stdout}{done.stderr}"
