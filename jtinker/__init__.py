"""jtinker: a JAX-native, self-hostable Tinker.

`import jtinker as tinker` gives the official SDK's names in-process: `tinker.ServiceClient()`,
`tinker.types`, `tinker.Datum`, `tinker.ModelInput`, `tinker.AdamParams`, `tinker.TensorData`. They are
imported on first use, so the command line does not pay for them.
"""

__version__ = "0.1.0"

_CLIENT = ("ServiceClient", "TrainingClient", "SamplingClient")
_TYPES = ("types", "Datum", "ModelInput", "AdamParams", "TensorData", "SamplingParams")


def __getattr__(name):
    if name in _CLIENT:
        from jtinker import client

        return getattr(client, name)
    if name in _TYPES:
        import tinker

        return getattr(tinker, name)
    raise AttributeError(f"module 'jtinker' has no attribute {name!r}")
