"""``attnprof demo``: generate a small dataset and model, run ``attnprof run`` on them, then ``attnprof figure``."""

from __future__ import annotations

import shlex
from pathlib import Path

from ..outputs import RunFolder
from ..profile import Profile
from .parser import build_parser
from .figure import cmd_figure
from .run import cmd_run


def cmd_demo(args) -> int:
    from ..singlecell.demo import write_demo_inputs

    if args.cells < 2:
        raise ValueError(f"--cells must be at least 2 (a female and a male cell to compare), got {args.cells}")
    out = Path(args.out)
    RunFolder(out, overwrite=args.overwrite).check()  # before the inputs are written into it
    taken = [] if args.overwrite else sorted(p for p in (out / "inputs").glob("*") if p.is_file())
    if taken:  # the demo's inputs would replace them: never without --overwrite
        raise ValueError(f"--out {out}: {taken[0]} exists where the demo writes its inputs; give a new --out, or "
                         f"--overwrite to replace them")  # fmt: skip
    inputs = write_demo_inputs(out / "inputs", n_cells=args.cells, seed=args.seed)
    argv = [
        "run", str(inputs["data.h5ad"]), "--groupby", "sex", "--compare", "female", "male",
        "--model", str(inputs["model.ckpt"]), "--vocab", str(inputs["vocab.txt"]),
        "--means", str(inputs["means.npy"]), "--panel", str(inputs["panel.txt"]),
        "--replicate", "animal", "--subset-by", "cell_type", "--gene-set", f"sex_biased={inputs['panel.txt']}",
        "--map-bins", "16",
        "--backend", args.backend, "--threads", str(args.threads), "--permutations", str(args.permutations),
        "--out", str(out),
    ] + (["--quiet"] if args.quiet else []) + (["--overwrite"] if args.overwrite else [])  # fmt: skip
    print(f"demo inputs in {out / 'inputs'}; profiling them as:\n  attnprof {shlex.join(argv)}\n")
    run_args = build_parser().parse_args(argv)
    run_args.argv = argv
    status = cmd_run(run_args)
    if status != 0:
        return status
    from ..singlecell.demo import findings

    comparison = Profile.load(out / "profile.npz").compare("female", "male", permutations=args.permutations)
    print("\n" + findings(comparison))
    figure = ["figure", str(out), "--maps-by", "cell_type"] + (["--overwrite"] if args.overwrite else [])
    print(f"\nthe Nicheformer figure's panels from the same profile:\n  attnprof {shlex.join(figure)}")
    figure_args = build_parser().parse_args(figure)
    figure_args.argv = figure
    return cmd_figure(figure_args)
