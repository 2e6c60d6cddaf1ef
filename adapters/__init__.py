"""Exporters from a frozen subnet to deployment toolchains (installed as `eqnet_plugin.adapters`)."""
__all__: list[str] = []
