"""Shared BPF headers (``tapio.h``), shipped inside tapio-core as ``tapio_core.ebpf``.

They are package data so any observer plugin, a third party's too, compiles
against the same helpers: ``#include <tapio.h>`` with this directory on the
include path (the agent adds it).
"""
