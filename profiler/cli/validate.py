"""``attnprof validate``: the fast backend against the reference and the model's own maps."""

from __future__ import annotations

import sys
from .common import gene_list, model_and_front, open_data, torch_device


def cmd_validate(args) -> int:
    from ..singlecell.batches import make_batches, select_cells
    from ..validate import validate

    if args.cells < 1:
        raise ValueError(f"--cells must be at least 1, got {args.cells}")
    with open_data(args.data) as adata:
        selection = select_cells(adata.obs, args.groupby, subset=args.subset, min_groups=1).head(args.cells)
        model, front = model_and_front(args, adata, torch_device(args.device))
        chunks = front.chunks(adata, rows=selection.rows, layer=args.layer, use_raw=args.use_raw, gene_key=args.gene_key)
        batch = next(make_batches(chunks, selection.codes_for, batch_size=len(selection), bucket_size=len(selection)))
    device = next(model.parameters()).device
    tokens = batch.tokens.to(device)
    inputs, ids, genes = front.inputs(tokens), front.gene_ids(tokens), front.genes
    table = validate(
        model, inputs, groups=batch.codes, tokens=ids, group_names=selection.groups, backend=args.backend,
        genes=genes, panel=gene_list(args.panel), window=args.window, n_context=front.n_context, adapter=front.adapter,
        map_bins=args.map_bins, map_length=front.context_length if args.map_bins else 0,
    )  # fmt: skip
    ran = table["backend"].iloc[0]
    against = ", ".join(dict.fromkeys(table["against"]))
    print(f"{len(batch)} cells x {tokens.shape[1]} tokens, backend {ran} (asked: {args.backend}) against: {against}")
    print(table.to_string(index=False, float_format=lambda x: f"{x:.2e}"))
    failed = table[~table["ok"]]
    if len(failed):
        which = ", ".join(f"{q} (vs {a.split(':')[0]})" for q, a in zip(failed["quantity"], failed["against"]))
        print(f"\nFAILED: {which} exceed the tolerance", file=sys.stderr)
        return 1
    print("\nall quantities within tolerance")
    return 0
