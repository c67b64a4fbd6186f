"""The site side: local training (Trainer) and what a site does with a task."""
