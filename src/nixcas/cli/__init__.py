"""The ``nixcas`` command line."""
