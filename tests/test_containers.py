"""What of the container route can be tested without a container engine: containers/python, the wrapper
the sbatch scripts run their tasks through, and the two image definitions agreeing on the image and on
--no-deps (docs/stacks.md)."""
import os
import re
import subprocess

from conftest import ROOT

WRAPPER = os.path.join(ROOT, "containers", "python")


def run_wrapper(tmp_path, *args, **env):
    """containers/python with a stand-in `apptainer` first on PATH that prints the command it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "apptainer").write_text('#!/bin/bash\necho "apptainer $*"\n')
    (bin_dir / "apptainer").chmod(0o755)
    return subprocess.run([WRAPPER, *args], cwd=tmp_path, capture_output=True, text=True,
                          env=dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", **env))


def test_the_wrapper_runs_python_in_the_image_with_the_gpus(tmp_path):
    image = tmp_path / "distrnn.sif"
    image.write_bytes(b"image")
    proc = run_wrapper(tmp_path, "-m", "distrnn.ptb", "--config", "large", DISTRNN_IMAGE=str(image))
    assert proc.returncode == 0 and proc.stdout == f"apptainer exec --nv {image} python -m distrnn.ptb --config large\n"


def test_the_wrapper_without_its_image_is_one_line(tmp_path):
    proc = run_wrapper(tmp_path, "-c", "pass", DISTRNN_IMAGE=str(tmp_path / "absent.sif"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"containers/python: no image {tmp_path / 'absent.sif'}: build it (apptainer "
                                        "build distrnn.sif containers/distrnn.def) or set DISTRNN_IMAGE"]


def test_both_images_build_on_the_same_base_and_install_without_dependencies():
    def read(name):
        with open(os.path.join(ROOT, "containers", name)) as f:
            return f.read()
    docker, apptainer = read("Dockerfile"), read("distrnn.def")
    base = re.search(r"^ARG BASE=(\S+)$", docker, re.M).group(1)
    assert re.search(r"^From: (\S+)$", apptainer, re.M).group(1) == base == "nvcr.io/nvidia/tensorflow:25.02-tf2-py3"
    for text in (docker, apptainer):
        installs = [line for line in text.splitlines() if "pip install" in line]
        of_distrnn = [line for line in installs if re.search(r"(\s\.|/opt/distrnn)\s*(\\|$)", line)]
        assert len(of_distrnn) == 1 and "--no-deps" in of_distrnn[0], installs
        # The image's TensorFlow, Horovod and numpy stay: nothing installs or upgrades them.
        assert not any(re.search(r"tensorflow|horovod|numpy|--upgrade", line) for line in installs), installs
    with open(os.path.join(ROOT, "docs", "stacks.md")) as f:
        assert base in f.read()
