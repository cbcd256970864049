"""async-component: call any Knative Service asynchronously."""

__version__ = "0.1.0"
