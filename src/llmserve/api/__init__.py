"""HTTP routes: thin feature slices over the request pipeline."""
