"""Reference twins of `jaxcnn.ops`: same names and signatures, naive and obviously correct.

Written as explicit windows and sums (gathers, einsum over patches, loops); never `lax.conv*` or
`reduce_window`, so they share no computation with the fast ops they verify.
"""
from jaxcnn.reference.conv import *  # noqa: F401,F403
from jaxcnn.reference.depthwise import *  # noqa: F401,F403
from jaxcnn.reference.groupnorm import *  # noqa: F401,F403
from jaxcnn.reference.misc import *  # noqa: F401,F403
from jaxcnn.reference.norm import *  # noqa: F401,F403
from jaxcnn.reference.pool import *  # noqa: F401,F403
from jaxcnn.reference.transpose import *  # noqa: F401,F403
