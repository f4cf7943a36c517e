"""Small reference models trained and shipped by diffquant, and the data they use."""
