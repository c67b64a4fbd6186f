"""The server side: site selection and plans (Strategy), aggregation, server optimizers."""
