"""Fast functional CNN ops: what jit runs. NHWC activations, HWIO kernels.

Each op has a twin of the same name and signature in `jaxcnn.reference`; `jaxcnn.verify` compares them.
"""
from jaxcnn.ops.conv import *  # noqa: F401,F403
from jaxcnn.ops.depthwise import *  # noqa: F401,F403
from jaxcnn.ops.groupnorm import *  # noqa: F401,F403
from jaxcnn.ops.misc import *  # noqa: F401,F403
from jaxcnn.ops.norm import *  # noqa: F401,F403
from jaxcnn.ops.pool import *  # noqa: F401,F403
from jaxcnn.ops.transpose import *  # noqa: F401,F403
