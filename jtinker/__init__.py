"""jtinker: a JAX-native, self-hostable Tinker. The in-process client API arrives with issue 5."""

__version__ = "0.1.0"
