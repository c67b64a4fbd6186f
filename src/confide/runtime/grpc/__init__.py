"""The real deployment: sites on other machines dial a confide server over gRPC with TLS."""
