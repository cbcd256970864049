"""Stand-ins for a Knative cluster on 127.0.0.1: ``async-component local``, its gateway and its processes."""


class StackError(RuntimeError):
    """The stack could not start or cannot do what was asked; the message says why."""
