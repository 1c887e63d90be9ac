"""The built-in procedural worlds: `shapes` (scenes of coloured shapes with questions and captions)
and `dishes` (top-down dish photos with ingredients, recipes, captions and questions; drawn by
`dish_drawing`, its recipes written by `dish_recipes`). `cache.py` holds what both share: the
cached, atomically written dataset folder and one random stream per split."""
