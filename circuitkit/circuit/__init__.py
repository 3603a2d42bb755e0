"""Circuit assembly from verified nodes: graph, evaluation, export, drawing."""
