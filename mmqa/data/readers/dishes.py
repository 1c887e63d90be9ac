"""The built-in dishes world with ingredients and recipes (`mmqa.data.worlds.dishes`), generated on first read."""

from mmqa.data.readers.generated import GeneratedReader
from mmqa.data.worlds.dishes import generate_dishes


class DishesReader(GeneratedReader):
    generate = generate_dishes
