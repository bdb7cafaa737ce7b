"""The blog post as its code ran, in one package (``../post/README.md`` in the design notes).

| module            | layer       | what                                                   |
|-------------------|-------------|--------------------------------------------------------|
| ``log``           | foundations | the numbers the post logged (package data)             |
| ``ladder``        | foundations | the ladder of cases from b to c                        |
| ``recipe``        | foundations | its batches: 25 images + copies, per-batch scaling     |
| ``manual_net``    | networks    | its network on the manual engine, case c's errors      |
| ``net``           | networks    | its network on autograd (``PostNet``), scale-only BN   |
| ``report``        | reports     | the post presets' section: bnlab beside the post's logs |

The network's plan (the layers both engines build) is :func:`bnlab.plans.post_net_plan`;
the post's cases and presets are in :mod:`bnlab.cases`. This package imports none of its
modules here, so each sits in its own layer (see the README's layout).
"""
