"""The built-in evaluation kinds, one module each, registered in eval/registry.py's BUILTIN."""
