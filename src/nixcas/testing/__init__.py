"""Shared test material: named fixtures and backend-independent contract suites.

* :mod:`nixcas.testing.fixtures` — the tvix/snix fixture blobs and Directories.
* :mod:`nixcas.testing.blobservice` — :class:`BlobServiceSuite`, the BlobService contract.
* :mod:`nixcas.testing.directoryservice` — :class:`DirectoryServiceSuite`, the
  DirectoryService contract.
* :mod:`nixcas.testing.pathinfoservice` — :class:`PathInfoServiceSuite`, the
  PathInfoService contract.
* :mod:`nixcas.testing.matrix` — which registry entries the suites run.

A backend's test module subclasses a suite (the subclass name must start with
``Test``), names the registry tags it runs in ``covers`` and provides the service
fixture; optional "raw" hooks (corrupting stored data, listing temporary files) let
the suite check what the service interface alone cannot.  The suites import pytest,
so this package is only for test code: it is left out of the wheel (``pyproject.toml``;
tests/unit/test_packaging.py checks that no shipped module imports pytest), and
tests/ and bench/ use it from the checkout.
"""
