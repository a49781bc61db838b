"""The castore over gRPC: servicers (server side), channels and status mapping.

The client backends live with their service kinds
(:mod:`nixcas.castore.blob.grpc`, :mod:`nixcas.castore.dirs.grpc`); this
package holds what both ends share: the one place where nixcas errors and
gRPC status codes are translated (:mod:`.status`), channel construction from
``grpc+…`` URLs (:mod:`.channel`), and the servicers that put any
BlobService/DirectoryService on the wire under the ``tvix.castore.v1`` and
``snix.castore.v1`` names, plus snix's ChunkStoreService/BlobStoreService
over any BlobService (:mod:`.chunkstore`, ``snix.castore.v1`` only).
"""
