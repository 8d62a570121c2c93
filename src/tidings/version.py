"""The version, in one place: read by setuptools, the ``connect`` reply, the
API's ``info`` and ``tidings --version``, and importable by any module without
importing the package's public names (which build on the server)."""

__version__ = "0.1.0"
