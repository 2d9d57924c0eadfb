"""The one exception type the command line turns into a one-line message and exit code 2."""


class DistillKacError(ValueError):
    """A problem with the user's input (arguments, files, configs) that has a clear one-line cause.

    Subclasses ValueError so that library callers can catch the usual type; the CLI prints
    ``distillkac: error: <message>`` and exits with status 2, without a traceback.
    """
