"""``attnprof report OUT``: rebuild a run folder's tables, figures and report from its ``profile.npz``.

For a run that failed after profiling (disk full, a killed job): the profile, the expensive part, was
moved in first and kept; this writes the rest the same way a run does (beside the folder, moved in when
complete) and completes the manifest. The run's own earlier outputs are replaced; a file the manifest
does not list is a user's and is refused unless ``--overwrite``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from .. import warnings_log
from ..outputs import PROFILE, RunFolder, written_summary
from ..summary import design_record, layer_summary, saved_contrast


def cmd_report(args) -> int:
    from ..checks import nothing_to_compare
    from ..profile import Profile
    from ..singlecell.write import write_outputs

    out = Path(args.out)
    if not (out / PROFILE).is_file():
        raise FileNotFoundError(f"{out} holds no {PROFILE}: give the folder of an `attnprof run` that profiled "
                                f"its cells")  # fmt: skip
    folder = RunFolder(out, overwrite=args.overwrite)
    previous = folder.previous_record()  # checks the manifest
    if not args.overwrite:
        foreign = folder.foreign_files(keep=(PROFILE,))
        if foreign:
            raise ValueError(
                f"{out} holds files no run.json lists where the report writes ({', '.join(foreign[:3])}"
                f"{' ...' if len(foreign) > 3 else ''}): move them away, or add --overwrite to replace them"
            )
    profile = Profile.load(out / PROFILE)
    a, b, min_cells = saved_contrast(profile, args.compare, args.min_cells)
    empty = nothing_to_compare(profile, a, b, min_cells)
    if empty:
        raise ValueError(f"{empty}: no tables or figures to write in {out}")
    for message in previous.get("warnings", []):  # the run's warnings stay in run.json and the report
        warnings_log.note(message)
    command = previous.get("command") or ["attnprof", *sys.argv[1:]]
    folder.clear_previous(keep=(PROFILE,))
    saved = profile.meta.get("contrast", {})  # the run's permutations and seed, so the tables come out the same
    with folder.staged(kept=(PROFILE,)) as staging:
        result = write_outputs(profile, a, b, staging, min_cells=min_cells, permutations=saved.get("permutations"),
                               seed=saved.get("seed", 0), figures=not args.no_figures, command=command)  # fmt: skip
    record = {k: v for k, v in previous.items() if k not in ("outputs", "warnings", "complete", "error")}
    record.update(command=command, contrast=[a, b], cells=profile.cells, replicates=profile.replicates,
                  **design_record(result["comparison"], profile),
                  rebuilt_by=["attnprof", *(sys.argv[1:] if args.argv is None else args.argv)])
    outputs = folder.finish(record)["outputs"]
    print(layer_summary(result["comparison"], profile))
    print(f"\nwrote {out}/: {written_summary(outputs)}")
    return 0
