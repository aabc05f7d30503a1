"""The live pipeline, the top of the library: sources -> threaded pipeline -> one ``DefenseStep`` ->
voting -> sinks, built from a ``RunConfig`` (``build``) and run end to end by ``runner.run``."""
