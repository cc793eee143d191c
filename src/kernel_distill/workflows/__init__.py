"""The workflow layer: one module per command, each a frozen request dataclass and a function that runs it.

A workflow checks its request, claims its output folder or file (:mod:`kernel_distill.runs`), computes by
calling the library, and writes its ``results.json`` (:mod:`kernel_distill.results`); it returns the
record. The command line (:mod:`kernel_distill.cli`) only parses arguments into a request, calls the
workflow and prints; a notebook or a script builds the same request in Python and gets the same folder and
record. Messages go through the workflow's ``log`` argument (``print`` by default).

Importing this package, or any of its modules, loads no JAX: each module imports the library inside its
functions, so that ``kernel-distill --help`` (which builds every subcommand's parser from these modules)
stays fast. See docs/ARCHITECTURE.md, "Workflows".
"""

# Each command's module, in the order of `kernel-distill --help`.
COMMAND_MODULES = ("datasets", "evaluate", "baseline", "kip", "label_solve", "transfer", "report", "zoo", "export",
                   "demo")
