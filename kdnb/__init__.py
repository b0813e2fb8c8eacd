"""kdnb: thin, tested helpers behind the notebooks that reproduce knowledge-distillation studies.

Modules are small and flat on purpose (read them in this order):
validate -> data -> samples -> models -> losses -> metrics -> train -> krr -> runs -> runner -> report -> cli.
"""
__version__ = "0.1.0"

# numerics puts OMP_WAIT_POLICY=PASSIVE into the environment (unless set) before it imports torch, so `import kdnb`
# ahead of torch is enough for plain Python and for children started from here (kdnb.numerics.THREAD_POLICY)
from . import numerics  # noqa: E402,F401
