"""Engines: the real vLLM runtime, the sim emulator, and the command lines that start them."""
