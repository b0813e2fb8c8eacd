"""kdnb: thin, tested helpers behind the notebooks that reproduce knowledge-distillation studies. Reading order:
1. study (the shape every study shares: setup cell, module contract, sections) and profiles (parameters per profile);
2. a study module, e.g. unseen_classes: PROFILES, check, VARIANTS (quirk flags), run, claims;
3. its pieces: validate -> data -> samples -> models -> losses -> metrics -> train (krr: exact kernel maths);
4. records: runs (run ids, digests, atomic writes, Run) -> report, glance, attribution (results/, verdicts);
5. batch: runner (papermill runs) -> sweep (local or Ray) -> cli (`kdnb run/sweep/report`); numerics (dtype, threads).
"""
__version__ = "0.1.0"

# numerics puts OMP_WAIT_POLICY=PASSIVE into the environment (unless set) before it imports torch, so `import kdnb`
# ahead of torch is enough for plain Python and for children started from here (kdnb.numerics.THREAD_POLICY)
from . import numerics  # noqa: E402,F401
