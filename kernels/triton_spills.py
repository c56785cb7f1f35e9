"""Written by ``python benches/sass_counts.py --spills``: spill bytes (stores + loads) that ptxas reported
for each (arch, kernel, head dim, DOT_PREC, config) it compiled. Configs that spill are never launched
(:func:`.triton_forward.spill_free`)."""

CHECKED: dict = {}
