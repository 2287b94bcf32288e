"""Generated gRPC stubs of proto/bankd/v1/bankd.proto (do not edit)."""
