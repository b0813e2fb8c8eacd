"""kdnb: thin, tested helpers behind the notebooks that reproduce knowledge-distillation studies.

Modules are small and flat on purpose (read them in this order):
validate -> data -> samples -> models -> losses -> metrics -> train -> krr -> runs -> report -> cli.
"""
__version__ = "0.1.0"
