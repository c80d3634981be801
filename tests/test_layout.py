"""The house rules that keep the code easy to change, checked on the sources and the seams they name:
no import cycles, no module importing a command line, options as the one source of the job flags, the
unrolling mode resolved by the job and never looked up by model code."""
import ast
import functools
import os
import re

import pytest
import tensorflow as tf

from conftest import ROOT
from distrnn import cli
from distrnn.mnist import cli as mnist_cli
from distrnn.mnist.configs import RunOptions as MNISTOptions
from distrnn.parallel import local_devices
from distrnn.ptb import cli as ptb_cli
from distrnn.ptb.configs import RunOptions as PTBOptions

PACKAGE = os.path.join(ROOT, "distrnn")


@functools.cache
def sources():
    """{module: (its parsed tree, its text)} for every module of the package."""
    found = {}
    for directory, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(directory, name)
                module = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".").removesuffix(".__init__")
                text = open(path, encoding="utf-8").read()
                found[module] = (ast.parse(text), text)
    return found


def import_graph():
    """{module: the distrnn modules it imports (at the top or inside functions)}, and the set of modules
    that are command lines (they define main)."""
    modules = {module: tree for module, (tree, _) in sources().items()}
    graph, commands = {}, set()
    for module, tree in modules.items():
        found = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("distrnn"):
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("distrnn")}
            elif isinstance(node, ast.FunctionDef) and node.name == "main" and node.col_offset == 0:
                commands.add(module)
        graph[module] = {m for m in found if m in modules and m != module}
    return graph, commands


def test_no_import_cycles_and_no_module_imports_a_command_line():
    graph, commands = import_graph()
    assert {"distrnn.devices", "distrnn.slurm", "distrnn.ptb.cli", "distrnn.mnist.cli"} <= commands
    importers = {(m, d) for m, deps in graph.items() for d in deps & commands if not m.endswith("__main__")}
    assert importers == set()
    done, path = set(), []

    def visit(module):
        assert module not in path, f"import cycle: {' -> '.join(path[path.index(module):] + [module])}"
        if module not in done:
            path.append(module)
            for dep in sorted(graph[module]):
                visit(dep)
            path.pop()
            done.add(module)

    for module in sorted(graph):
        visit(module)


@pytest.mark.parametrize("parser_module, options_cls, config", [(ptb_cli, PTBOptions, "small"),
                                                               (mnist_cli, MNISTOptions, "lstm")])
def test_flags_come_from_the_options(parser_module, options_cls, config):
    parser, _ = parser_module.build_parser()
    assert cli.job_options(parser.parse_args([]), options_cls) == options_cls(config_name=config)
    flags = {o for action in parser._actions for o in action.option_strings}
    fields = {f"--{f.name}" for f in options_cls.__dataclass_fields__.values() if f.metadata}
    assert fields <= flags and len(fields) >= 22
    changed = parser.parse_args(["--seed", "9", "--swap_memory", "--placement", "pipeline", "--mem_warn", "0.5"])
    options = cli.job_options(changed, options_cls)
    assert (options.seed, options.swap_memory, options.placement, options.mem_warn) == (9, True, "pipeline", 0.5)
    assert options.memory.swap and not options.memory.recompute


def test_runs_on_gpu_follows_the_devices_given():
    assert local_devices.runs_on_gpu(["/device:GPU:0", "/device:GPU:1"])
    assert not local_devices.runs_on_gpu(["/device:CPU:0", "/device:CPU:1"])
    # Given none, TensorFlow chooses: a GPU wherever there is one.
    assert local_devices.runs_on_gpu([]) == bool(tf.config.list_logical_devices("GPU"))


def test_model_code_never_lists_devices():
    """Only start-up code (the job, the devices command, the World, the memory monitor) asks TensorFlow which
    devices exist; models, cells, stacks and kernels take them as arguments."""
    for sub in ("rnn", os.path.join("ptb", "model.py"), os.path.join("mnist", "model.py"), "numerics",
                os.path.join("parallel", "placement.py")):
        path = os.path.join(PACKAGE, sub)
        files = [os.path.join(path, f) for f in os.listdir(path)] if os.path.isdir(path) else [path]
        for name in files:
            if name.endswith(".py"):
                text = open(name, encoding="utf-8").read()
                assert "list_logical_devices" not in text and "list_physical_devices" not in text, name


def test_the_folders_draw_the_architecture():
    """A handful of modules at the top (the command-line plumbing, config, errors, the commands that are not
    a job's); everything else in a package that opens by saying what it holds."""
    top = sorted(n for n in os.listdir(PACKAGE) if n.endswith(".py"))
    assert len(top) <= 11, top
    packages = [m for m, (tree, _) in sources().items() if os.path.isdir(os.path.join(ROOT, *m.split(".")))]
    assert {"distrnn.run", "distrnn.parallel", "distrnn.memory", "distrnn.numerics", "distrnn.rnn", "distrnn.ptb",
            "distrnn.mnist"} <= set(packages)
    for package in packages:
        assert len(ast.get_docstring(sources()[package][0]) or "") > 80, f"{package} does not say what it holds"


def test_horovod_is_imported_in_one_module_and_nothing_else_knows_the_engine():
    """The engine is a seam: Horovod is imported in distrnn.parallel.horovod only, and no code outside the
    engines branches on which one runs (an `hvd` handle, an engine's class or name)."""
    engines = {"distrnn.parallel.horovod", "distrnn.parallel.collective"}
    for module, (tree, text) in sources().items():
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        if any(name.split(".")[0] == "horovod" for name in imported):
            assert module == "distrnn.parallel.horovod", f"{module} imports Horovod"
        if any(name.startswith("tensorflow.python.distribute") for name in imported):
            assert module == "distrnn.parallel.collective", f"{module} imports tf.distribute's internals"
        # The interface names the engine a World is (for the log and the metrics); join picks one.
        if module not in engines | {"distrnn.parallel.join", "distrnn.parallel.world"}:
            assert not imported & {f"distrnn.parallel.{e}" for e in ("horovod", "collective")}, module
            assert not re.search(r"HorovodWorld|CollectiveWorld", text), module
            assert not re.search(r"\bhvd\b|(?<!options)(?<!args)\.engine\b", text), f"{module} asks which engine runs"


def test_the_cell_table_is_the_only_place_cells_are_compared():
    """What a cell can run (fused kernels, the hand-written backward and its memory modes, peepholes, a forget
    bias) is read from names.CELL_KINDS; no other code compares a cell's name or class."""
    compared = re.compile(r"""[!=]= *["'](lstm|gru|rnn)["']|["'](lstm|gru|rnn)["'] *[!=]=|"""
                          r"""isinstance\([^)]*(LSTMCell|GRUCell|BasicRNNCell)""")
    for module, (_, text) in sources().items():
        if module != "distrnn.names":
            assert not compared.search(text), f"{module}: {compared.search(text).group(0)}"


def test_the_loop_asks_the_trainer_not_its_fields():
    """The loop talks to run.trainer.Trainer's methods (set the learning rate, the weights' norm, the checkpoint's
    parts), never to a job's model or optimizer, so a job may hold them as it likes."""
    _, text = sources()["distrnn.run.loop"]
    assert not re.search(r"trainer\.(model|optimizer)\b", text)


def test_the_loop_knows_no_job_model_or_engine():
    """distrnn.run.loop is the one loop for every job: what a model is (config, unrolling, placement) is the
    job's to say (run.job.Job.start_lines, model_metrics), what it measures its Measures'; it names no job."""
    tree, _ = sources()["distrnn.run.loop"]
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    names |= {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    words = {w for name in names for w in re.split(r"[._]", name)}
    assert not words & {"ptb", "mnist", "perplexity", "accuracy", "unrolling", "plan", "rnn", "precision"}
    assert not names & {"config", "model", "optimizer", "devices", "on_gpu", "memory_note"}


def test_every_job_is_a_job_module_run_through_start():
    """A job is a package with a job.py: one run.job.Job subclass and a `run` that hands it to run.start.run,
    the one start every command and library caller goes through."""
    from distrnn.run import job as base
    for package in ("distrnn.ptb", "distrnn.mnist"):
        tree, _ = sources()[f"{package}.job"]
        jobs = [n.name for n in tree.body if isinstance(n, ast.ClassDef) and any(
            getattr(b, "id", None) == "Job" for b in n.bases)]
        run, = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        calls = [ast.unparse(n.func) for n in ast.walk(run) if isinstance(n, ast.Call)]
        assert len(jobs) == 1 and calls == ["start.run"], (package, jobs, calls)
    undefined = [name for name in ("data_line", "learning_rate", "step", "figures", "divergence_advice",
                                   "validate", "finish", "test") if name not in vars(base.Job)]
    assert not undefined


def test_where_float16_sums_is_no_process_wide_setting():
    """How float16 products are summed travels with the Unrolling a model is given (numerics.ops.matmul_for):
    no module keeps a setting it changes at run time, but for oneDNN's choice (made once, before TensorFlow
    loads), the warning filter of compat and the crash points of the tests."""
    changed = {m for m, (tree, _) in sources().items() if any(isinstance(n, ast.Global) for n in ast.walk(tree))}
    assert changed <= {"distrnn.cpu", "distrnn.compat", "distrnn.run.faults"}, changed
