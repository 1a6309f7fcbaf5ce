"""Small end-to-end demonstrations that run on a CPU in minutes with no download."""
